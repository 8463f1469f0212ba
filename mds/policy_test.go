package mds

import (
	"testing"

	"google.golang.org/grpc"
)

// TestPolicyCoversEveryMethod: every method the MDS serves has its roles
// in Policy (a method left out would be refused to everyone), and Policy
// names no method the MDS does not serve.
func TestPolicyCoversEveryMethod(t *testing.T) {
	g := grpc.NewServer()
	registerServices(g, &Server{})
	served := map[string]bool{}
	for svc, info := range g.GetServiceInfo() {
		for _, m := range info.Methods {
			name := "/" + svc + "/" + m.Name
			served[name] = true
			if len(Policy.Methods[name]) == 0 {
				t.Errorf("%s has no roles in Policy", name)
			}
		}
	}
	if len(served) < 30 {
		t.Fatalf("found only %d served methods", len(served))
	}
	for name := range Policy.Methods {
		if !served[name] {
			t.Errorf("Policy names %s, which the MDS does not serve", name)
		}
	}
}
