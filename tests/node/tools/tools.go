//go:build tools

// Package tools pins the CNI plugins and crane that tests/node/build.sh builds.
package tools

import (
	_ "github.com/containernetworking/plugins/plugins/ipam/host-local"
	_ "github.com/containernetworking/plugins/plugins/main/bridge"
	_ "github.com/containernetworking/plugins/plugins/main/loopback"
	_ "github.com/containernetworking/plugins/plugins/meta/portmap"
	_ "github.com/google/go-containerregistry/cmd/crane"
	_ "sigs.k8s.io/cri-tools/cmd/crictl"
)
