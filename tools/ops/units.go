package ops

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"strconv"
	"strings"
)

// ErrBadSize is returned for a size or offset that cannot be read.
var ErrBadSize = errors.New("bad size")

// sizeUnits are the binary units sizes accept. The one-letter forms mean
// the same binary units (as in qemu-img and dd); decimal forms such as "GB"
// are refused because they are ambiguous.
var sizeUnits = []struct {
	suffix string
	shift  uint
}{
	{"KiB", 10}, {"MiB", 20}, {"GiB", 30}, {"TiB", 40}, {"PiB", 50},
	{"K", 10}, {"M", 20}, {"G", 30}, {"T", 40}, {"P", 50},
	{"B", 0},
}

// ParseSize reads a byte count: plain bytes ("4096") or a whole number with
// a binary unit ("512MiB", "10GiB", "10G", "1 TiB"). It wraps ErrBadSize.
func ParseSize(s string) (uint64, error) {
	in := strings.TrimSpace(s)
	if in == "" {
		return 0, fmt.Errorf("%w: empty", ErrBadSize)
	}
	num, shift := in, uint(0)
	for _, u := range sizeUnits {
		if strings.HasSuffix(in, u.suffix) {
			num, shift = strings.TrimSpace(strings.TrimSuffix(in, u.suffix)), u.shift
			break
		}
	}
	for _, dec := range []string{"KB", "MB", "GB", "TB", "PB", "kB"} {
		if strings.HasSuffix(in, dec) {
			return 0, fmt.Errorf("%w: %q: decimal units are ambiguous; use %siB", ErrBadSize, s, dec[:1])
		}
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: %q: want bytes or a whole number with KiB, MiB, GiB, TiB or PiB", ErrBadSize, s)
	}
	if hi, lo := bits.Mul64(n, 1<<shift); hi != 0 || lo > math.MaxInt64 {
		return 0, fmt.Errorf("%w: %q is too large", ErrBadSize, s)
	}
	return n << shift, nil
}
