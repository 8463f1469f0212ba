package mdsclient

import (
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestPlaintextClientSeesTheTLSServerHangUp: a TLS listener hangs up on a
// plaintext client before any HTTP/2 preface, with an end of stream or,
// when the client's preface is still unread on its side, a reset; both
// read as a server that probably requires TLS, anything else does not.
func TestPlaintextClientSeesTheTLSServerHangUp(t *testing.T) {
	for msg, want := range map[string]bool{
		`connection error: desc = "error reading server preface: EOF"`:                                                               true,
		`connection error: desc = "error reading server preface: connection reset by peer"`:                                          true,
		`connection error: desc = "error reading server preface: read tcp 127.0.0.1:1->127.0.0.1:2: read: connection reset by peer"`: true,
		`connection error: desc = "transport: Error while dialing: dial tcp 127.0.0.1:2: connect: connection refused"`:               false,
		`connection error: desc = "transport: connection reset by peer"`:                                                             false,
	} {
		if got := closedBeforePreface(status.Error(codes.Unavailable, msg)); got != want {
			t.Errorf("closedBeforePreface(%q) = %v, want %v", msg, got, want)
		}
	}
}
