// Package units reads and writes byte sizes the way Cairn's commands and
// config files spell them: a plain number of bytes or one with a binary
// suffix (KiB, MiB, GiB, TiB, PiB; K, M, G, T, P read the same way; a
// trailing B is allowed: 512B, 4KB).
package units

import (
	"fmt"
	"strconv"
	"strings"
)

var suffixes = []struct {
	suffix string
	mult   uint64
}{
	{"PiB", 1 << 50}, {"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
	{"PB", 1 << 50}, {"TB", 1 << 40}, {"GB", 1 << 30}, {"MB", 1 << 20}, {"KB", 1 << 10},
	{"P", 1 << 50}, {"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1},
}

// ParseBytes reads a byte size such as "10GiB", "512MiB" or "4096".
func ParseBytes(s string) (uint64, error) {
	num := strings.TrimSpace(s)
	mult := uint64(1)
	for _, u := range suffixes {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSpace(strings.TrimSuffix(num, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q: want a number of bytes, optionally with KiB, MiB, GiB or TiB", s)
	}
	if mult > 1 && n > (1<<64-1)/mult {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n * mult, nil
}

// FormatBytes writes a byte size with the largest binary suffix that keeps
// it exact, or with one decimal when it is not a whole number of any.
func FormatBytes(n uint64) string {
	for _, u := range suffixes[:5] {
		if n >= u.mult && n%u.mult == 0 {
			return strconv.FormatUint(n/u.mult, 10) + u.suffix
		}
	}
	for _, u := range suffixes[:5] {
		if n >= u.mult {
			return strconv.FormatFloat(float64(n)/float64(u.mult), 'f', 1, 64) + u.suffix
		}
	}
	return strconv.FormatUint(n, 10) + "B"
}

// Bytes is a flag.Value for byte sizes.
type Bytes uint64

// String implements flag.Value.
func (b *Bytes) String() string { return FormatBytes(uint64(*b)) }

// Set implements flag.Value.
func (b *Bytes) Set(s string) error {
	n, err := ParseBytes(s)
	if err != nil {
		return err
	}
	*b = Bytes(n)
	return nil
}
