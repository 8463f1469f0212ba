package ops

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrNotConfirmed is returned when the operator does not confirm a
// destructive command; nothing was changed.
var ErrNotConfirmed = errors.New("not confirmed; nothing was changed")

// ErrNotAllocated is returned by query chunk for an offset whose segment was
// never written.
var ErrNotAllocated = errors.New("not allocated")

// exitError carries an exit code. With a nil err the command already printed
// its verdict and only the code is returned.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit code %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// usageError marks err as a command-line mistake (exit code 2).
func usageError(err error) error { return &exitError{code: ExitUsage, err: err} }

// unreachable marks err as a server that did not answer (exit code 5).
func unreachable(err error) error { return &exitError{code: ExitUnreachable, err: err} }

// notFound marks err as naming something that does not exist (exit code 6).
func notFound(err error) error { return &exitError{code: ExitNotFound, err: err} }

// verdict is the error a check returns after printing its report.
func verdict(code int) error {
	if code == ExitOK {
		return nil
	}
	return &exitError{code: code}
}

// notMDSMessage is how mdsclient names an address that answers but is no
// MDS.
var notMDSMessage = regexp.MustCompile(`(\S+) is not an MDS: (.*)$`)

// rpcError is a failed call, reported as "what: message" while keeping the
// gRPC status for classification.
type rpcError struct {
	what string
	st   *status.Status
	err  error
}

func (e *rpcError) Error() string {
	msg := e.st.Message()
	// mdsclient names the method and every address it tried; the method is
	// noise to an operator, the addresses are not.
	if i := strings.Index(msg, "no MDS leader answered"); i > 0 {
		msg = msg[i:]
	}
	if m := notMDSMessage.FindStringSubmatchIndex(msg); m != nil {
		// mdsclient found a server that is no MDS at an --mds address:
		// say what it probably is.
		addr, why := msg[m[2]:m[3]], msg[m[4]:m[5]]
		hint := "not a gRPC server: a gateway's NBD or iSCSI port?"
		switch {
		case strings.Contains(why, "unknown service"):
			hint = "it answers as a chunkserver?"
		case strings.Contains(why, "looked like an HTTP/1.1 header"):
			hint = "it answers HTTP/1.1, not gRPC: a metrics port?"
		}
		msg = fmt.Sprintf("%s%s is not an MDS (%s) — pass the MDS address with --mds (%s)", msg[:m[0]], addr, hint, why)
	} else if strings.Contains(msg, "looked like an HTTP/1.1 header") {
		// An HTTP server answered where gRPC was expected.
		msg = "the address answers HTTP/1.1, not gRPC: is it a metrics port rather than the MDS's (or chunkserver's) gRPC port? (" + msg + ")"
	}
	// Say each thing once: "volume "x" does not exist", not
	// "volume "x": volume "x" does not exist".
	if strings.HasPrefix(msg, e.what) {
		return msg
	}
	return e.what + ": " + msg
}

func (e *rpcError) Unwrap() error { return e.err }

// GRPCStatus lets status.Code see through the wrapping.
func (e *rpcError) GRPCStatus() *status.Status { return e.st }

// rpcErr wraps a failed call with what was being done.
func rpcErr(what string, err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("%s: %w", what, err)
	}
	return &rpcError{what: what, st: st, err: err}
}

// mdsForce ends the MDS's refusals that force lifts (a volume open for
// writing, published, with snapshots).
const mdsForce = " (use --force)"

// forceHint puts the command line that goes ahead in place of the MDS's
// "(use --force)" at the end of a refusal that force lifts.
func forceHint(err error, command string) error {
	var re *rpcError
	if !errors.As(err, &re) || re.st.Code() != codes.FailedPrecondition || !strings.HasSuffix(re.st.Message(), mdsForce) {
		return err
	}
	msg := strings.TrimSuffix(re.st.Message(), mdsForce) + "; to go ahead anyway: cairn-ops " + command
	st := status.New(re.st.Code(), msg)
	return &rpcError{what: re.what, st: st, err: st.Err()}
}

// exitCode maps an error to the exit code.
func (a *app) exitCode(err error) int {
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if errors.Is(err, ErrNotConfirmed) {
		return ExitError
	}
	if st, ok := status.FromError(err); ok && st.Code() != codes.Unknown {
		switch st.Code() {
		case codes.NotFound:
			return ExitNotFound
		case codes.Unavailable, codes.DeadlineExceeded:
			return ExitUnreachable
		case codes.InvalidArgument:
			return ExitUsage
		default:
			return ExitError
		}
	}
	if !a.ran {
		return ExitUsage // cobra's own complaints: unknown command, flag, args
	}
	return ExitError
}

// codeName is the stable name of an exit code in JSON error objects.
func codeName(code int) string {
	switch code {
	case ExitOK:
		return "ok"
	case ExitUsage:
		return "usage"
	case ExitUnhealthy:
		return "unhealthy"
	case ExitInconsistent:
		return "inconsistent"
	case ExitUnreachable:
		return "unreachable"
	case ExitNotFound:
		return "not_found"
	default:
		return "failed"
	}
}

func errorMessage(err error) string {
	// A bare gRPC error prints as "rpc error: code = ... desc = ..."; the
	// description is what an operator needs. Wrapped ones (rpcErr) already
	// read well.
	if st, ok := err.(interface{ GRPCStatus() *status.Status }); ok {
		if _, wrapped := err.(*rpcError); !wrapped {
			return st.GRPCStatus().Message()
		}
	}
	return err.Error()
}
