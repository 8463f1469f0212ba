package units

import "testing"

func TestParseBytes(t *testing.T) {
	good := map[string]uint64{
		"0": 0, "4096": 4096, "512B": 512, "4KiB": 4 << 10, "4K": 4 << 10, "4KB": 4 << 10,
		"16MiB": 16 << 20, " 10 GiB ": 10 << 30, "2TiB": 2 << 40, "1PiB": 1 << 50,
		"10gb": 10 << 30, "10g": 10 << 30, "1.5GiB": 1536 << 20, "1.5g": 1536 << 20, "0.5KiB": 512, "64mib": 64 << 20,
	}
	for in, want := range good {
		if got, err := ParseBytes(in); err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "abc", "-1", "10XiB", "99999999999PiB", "1.5", "0.3KiB", "1e3", "GiB", "1/2KiB", "+5"} {
		if _, err := ParseBytes(in); err == nil {
			t.Errorf("ParseBytes(%q) accepted", in)
		}
	}
}

func TestFormatBytes(t *testing.T) {
	cases := map[uint64]string{0: "0B", 512: "512B", 4096: "4KiB", 16 << 20: "16MiB", 10 << 30: "10GiB", 1536 << 20: "1536MiB", 1536<<20 + 1: "1.5GiB"}
	for in, want := range cases {
		if got := FormatBytes(in); got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", in, got, want)
		}
	}
}
