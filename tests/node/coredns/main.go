// A minimal CoreDNS for the real test node (tests/node/build.sh): cluster DNS for Pods, as on a
// real cluster, with only the plugins the node's Corefile uses (tests/support/node.rs). Built as
// CoreDNS documents for embedding (dnsserver.SetDirectives); nothing here is part of the operator.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	// In CoreDNS's own order (core/dnsserver/zdirectives.go), which is the order a query meets them.
	if err := dnsserver.SetDirectives([]string{"bind", "ready", "log", "errors", "kubernetes"}); err != nil {
		panic(err)
	}
	coremain.Run()
}
