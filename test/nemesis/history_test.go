package nemesis

import (
	"strings"
	"testing"
	"time"
)

var k = Key{Vol: "v", Block: 1}

func w(v uint64, call, ret int64) Op {
	return Op{Key: k, Write: true, Value: v, Call: call, Return: ret}
}
func rd(v uint64, call, ret int64) Op { return Op{Key: k, Value: v, Call: call, Return: ret} }

func TestCheckAcceptsLinearizableHistories(t *testing.T) {
	ops := []Op{
		w(1, 0, 10), rd(1, 11, 12),
		w(2, 13, 20), rd(1, 14, 15), // concurrent with write 2: the old value is fine
		rd(2, 21, 22),
		w(3, 23, Infinity), // unknown, observed later
		rd(2, 24, 25), rd(3, 30, 31),
		w(4, 32, Infinity), // unknown, never observed: pruned
		rd(3, 40, 41),
	}
	v := Check(ops, map[Key]uint64{k: 3}, time.Minute)
	if len(v.Bad) != 0 || len(v.Lost) != 0 || len(v.Foreign) != 0 || v.Unknown {
		t.Fatalf("a linearizable history was rejected: %+v", v)
	}
	if v.Pruned != 1 {
		t.Fatalf("pruned %d unknown writes, want 1", v.Pruned)
	}
	// The final value may also be an unknown write's.
	v = Check(ops[:len(ops)-1], map[Key]uint64{k: 4}, time.Minute)
	if len(v.Lost) != 0 || len(v.Foreign) != 0 {
		t.Fatalf("a final value from an unknown write was rejected: %+v", v)
	}
}

// A stale read: the value read back after a newer write completed.
func TestCheckRejectsStaleRead(t *testing.T) {
	ops := []Op{w(1, 0, 10), w(2, 11, 20), rd(1, 21, 22)}
	v := Check(ops, map[Key]uint64{k: 2}, time.Minute)
	if len(v.Bad) != 1 || v.Bad[0] != k {
		t.Fatalf("a stale read was not found: %+v", v)
	}
}

// A write applied twice (seen, overwritten, then seen again) is not
// linearizable even though the write's outcome interval covers both.
func TestCheckRejectsWriteAppliedTwice(t *testing.T) {
	ops := []Op{w(1, 0, 100), rd(1, 10, 11), w(2, 20, 30), rd(2, 31, 32), rd(1, 101, 102)}
	v := Check(ops, map[Key]uint64{k: 1}, time.Minute)
	if len(v.Bad) != 1 {
		t.Fatalf("a write applied twice was not found: %+v", v)
	}
}

func TestCheckRejectsTornRead(t *testing.T) {
	ops := []Op{w(1, 0, 10), rd(Torn, 11, 12)}
	if v := Check(ops, map[Key]uint64{k: 1}, time.Minute); len(v.Bad) != 1 {
		t.Fatalf("a torn read was not found: %+v", v)
	}
}

func TestCheckFinalCountsLostWrites(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ops   []Op
		final uint64
		lost  bool
	}{
		{"older than an acknowledged write", []Op{w(1, 0, 10), w(2, 11, 20)}, 1, true},
		{"zero after an acknowledged write", []Op{w(1, 0, 10)}, 0, true},
		{"zero with only unknown writes", []Op{w(1, 0, Infinity)}, 0, false},
		{"concurrent writes: either may be final", []Op{w(1, 0, 10), w(2, 5, 15)}, 1, false},
		{"an unknown write after the acknowledged one", []Op{w(1, 0, 10), w(2, 11, 20), w(3, 21, Infinity)}, 3, false},
		{"the latest acknowledged write", []Op{w(1, 0, 10), w(2, 11, 20)}, 2, false},
	} {
		lost, foreign := checkFinal(tc.ops, map[Key]uint64{k: tc.final})
		if (len(lost) == 1) != tc.lost || len(foreign) != 0 {
			t.Errorf("%s: lost %v foreign %v, want lost=%v", tc.name, lost, foreign, tc.lost)
		}
	}
	if _, foreign := checkFinal([]Op{w(1, 0, 10)}, map[Key]uint64{k: 7}); len(foreign) != 1 {
		t.Errorf("a final value no write wrote was not reported")
	}
}

func TestBlockEncoding(t *testing.T) {
	b := BlockOf(42)
	if got := ValueOf(b); got != 42 {
		t.Fatalf("decoded %d, want 42", got)
	}
	b[4000] ^= 1
	if got := ValueOf(b); got != Torn {
		t.Fatalf("a block with one flipped bit decoded as %d", got)
	}
}

func TestGenKeysAreDistinct(t *testing.T) {
	seen := map[Key]int{}
	for g := range MaxGens {
		for _, key := range genKeys("v", g) {
			if prev, dup := seen[key]; dup {
				t.Fatalf("generation %d reuses %v of generation %d", g, key, prev)
			}
			if key.Block < 0 || key.Block*BlockSize >= VolSize {
				t.Fatalf("generation %d: block %d outside the volume", g, key.Block)
			}
			seen[key] = g
		}
	}
}

func TestWitness(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		ops        []Op
	}{
		{"stale", "stale read", []Op{w(1, 0, 10), w(2, 11, 20), rd(1, 21, 22)}},
		{"stale zero", "stale read", []Op{w(1, 0, 10), rd(0, 11, 12)}},
		{"twice", "reappears", []Op{w(1, 0, 100), rd(1, 10, 11), w(2, 20, 30), rd(2, 31, 32), rd(1, 101, 102)}},
		{"torn", "torn", []Op{w(1, 0, 10), rd(Torn, 11, 12)}},
		{"fine", "", []Op{w(1, 0, 10), w(2, 5, 20), rd(1, 11, 12), rd(2, 21, 22)}},
	} {
		got := Witness(tc.ops, k)
		if !strings.Contains(got, tc.want) || (tc.want == "" && got != "") {
			t.Errorf("%s: witness %q, want one saying %q", tc.name, got, tc.want)
		}
	}
}
