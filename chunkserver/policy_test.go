package chunkserver

import (
	"testing"

	"google.golang.org/grpc"

	"cairn.io/cairn/copyset/transport"
	"cairn.io/cairn/internal/wire"
)

// TestPolicyCoversEveryMethod: every gRPC method and wire request or
// message the chunkserver serves has its roles in Policy (one left out
// would be refused to everyone), and Policy names nothing else.
func TestPolicyCoversEveryMethod(t *testing.T) {
	g, w := grpc.NewServer(), wire.NewServer(wire.ServerOptions{})
	(&Server{}).registerServices(g, w, transport.New(transport.Config{NodeID: 1}))
	served := map[string]bool{}
	for svc, info := range g.GetServiceInfo() {
		for _, m := range info.Methods {
			served["/"+svc+"/"+m.Name] = true
		}
	}
	for _, name := range w.Methods() {
		served[name] = true
	}
	if len(served) < 11 {
		t.Fatalf("found only %d served methods: %v", len(served), served)
	}
	for name := range served {
		if len(Policy.Methods[name]) == 0 {
			t.Errorf("%s has no roles in Policy", name)
		}
	}
	for name := range Policy.Methods {
		if !served[name] {
			t.Errorf("Policy names %s, which the chunkserver does not serve", name)
		}
	}
	if len(Policy.Default) != 0 {
		t.Errorf("methods not listed are open to %v", Policy.Default)
	}
}
