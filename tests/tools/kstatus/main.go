// Command kstatus reads Kubernetes objects as JSON (one object, a list, or a stream of objects)
// on stdin and prints, per object, the status that sigs.k8s.io/cli-utils/pkg/kstatus computes:
// one JSON line {"kind","namespace","name","status","message"}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
	Status    string `json:"status"`
	Message   string `json:"message"`
}

func main() {
	dec := json.NewDecoder(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err == io.EOF {
			return
		} else if err != nil {
			fail(err)
		}
		// Kubernetes' JSON decoding: integers become int64, as unstructured accessors expect.
		var obj map[string]interface{}
		if err := utiljson.Unmarshal(raw, &obj); err != nil {
			fail(err)
		}
		objs := []map[string]interface{}{obj}
		if items, ok := obj["items"].([]interface{}); ok {
			objs = objs[:0]
			for _, item := range items {
				m, ok := item.(map[string]interface{})
				if !ok {
					fail(fmt.Errorf("list item is not an object"))
				}
				objs = append(objs, m)
			}
		}
		for _, o := range objs {
			u := &unstructured.Unstructured{Object: o}
			res, err := status.Compute(u)
			if err != nil {
				fail(fmt.Errorf("%s/%s: %w", u.GetKind(), u.GetName(), err))
			}
			if err := out.Encode(result{u.GetKind(), u.GetNamespace(), u.GetName(), res.Status.String(), res.Message}); err != nil {
				fail(err)
			}
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(1)
}
