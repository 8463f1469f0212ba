package nemesis

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"sort"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"
)

// BlockSize is the size of one register: a 4 KiB block holding one value
// repeated.
const BlockSize = 4096

// Key names a register: a volume and a block of it.
type Key struct {
	Vol   string
	Block int64 // block index (offset / BlockSize)
}

func (k Key) String() string { return fmt.Sprintf("%s/%d", k.Vol, k.Block) }

// Op is one recorded operation. Times are nanoseconds since the history
// began. A write whose outcome is unknown has Return = Infinity.
type Op struct {
	Client int
	Key    Key
	Write  bool
	Value  uint64 // written, or read (Torn when the block was not one value)
	Call   int64
	Return int64
}

// Infinity is the return time of a write that may have been applied at
// any time after its call.
const Infinity = math.MaxInt64

// Torn is the value recorded for a read whose block did not hold one value
// repeated; no write writes it, so the history is not linearizable.
const Torn = math.MaxUint64

// History records operations of all clients; safe for concurrent use.
type History struct {
	start time.Time
	mu    sync.Mutex
	ops   []Op
	next  uint64
}

// NewHistory starts a history at the current time.
func NewHistory() *History { return &History{start: time.Now()} }

// Now is the current time on the history's clock.
func (h *History) Now() int64 { return int64(time.Since(h.start)) }

// At converts a history time to wall time.
func (h *History) At(t int64) time.Time { return h.start.Add(time.Duration(t)) }

// NextValue returns a value never returned before (never 0, the value of
// a block never written).
func (h *History) NextValue() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.next++
	return h.next
}

// Add records an operation.
func (h *History) Add(op Op) {
	h.mu.Lock()
	h.ops = append(h.ops, op)
	h.mu.Unlock()
}

// Take returns and forgets the operations on the given keys.
func (h *History) Take(keys map[Key]bool) []Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out, keep []Op
	for _, op := range h.ops {
		if keys[op.Key] {
			out = append(out, op)
		} else {
			keep = append(keep, op)
		}
	}
	h.ops = keep
	return out
}

// BlockOf encodes a value as a block.
func BlockOf(v uint64) []byte {
	b := make([]byte, BlockSize)
	for i := 0; i < BlockSize; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], v)
	}
	return b
}

// ValueOf decodes a block; a block that is not one value repeated is Torn.
func ValueOf(b []byte) uint64 {
	v := binary.LittleEndian.Uint64(b)
	for i := 8; i < len(b); i += 8 {
		if !bytes.Equal(b[i:i+8], b[:8]) {
			return Torn
		}
	}
	return v
}

// registerModel is a register per key: a write sets it, a read returns it.
var registerModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[Key][]porcupine.Operation{}
		var keys []Key
		for _, op := range history {
			k := op.Input.(regInput).key
			if _, ok := byKey[k]; !ok {
				keys = append(keys, k)
			}
			byKey[k] = append(byKey[k], op)
		}
		out := make([][]porcupine.Operation, 0, len(keys))
		for _, k := range keys {
			out = append(out, byKey[k])
		}
		return out
	},
	Init: func() any { return uint64(0) },
	Step: func(state, input, output any) (bool, any) {
		in := input.(regInput)
		if in.write {
			return true, in.value
		}
		return output.(uint64) == state.(uint64), state
	},
	Equal: func(a, b any) bool { return a.(uint64) == b.(uint64) },
	DescribeOperation: func(input, output any) string {
		in := input.(regInput)
		if in.write {
			return fmt.Sprintf("%s write(%d)", in.key, in.value)
		}
		if output.(uint64) == Torn {
			return fmt.Sprintf("%s read() -> TORN", in.key)
		}
		return fmt.Sprintf("%s read() -> %d", in.key, output)
	},
	DescribeState: func(state any) string { return fmt.Sprint(state) },
}

type regInput struct {
	key   Key
	write bool
	value uint64
}

// Verdict is the outcome of checking one set of keys.
type Verdict struct {
	Ops          int
	Pruned       int   // unknown writes never observed, dropped before checking
	Bad          []Key // keys whose history is not linearizable
	Unknown      bool  // the checker timed out
	Lost         []Key // final value older than an acknowledged write
	Foreign      []Key // final value written by no operation (or torn)
	info         porcupine.LinearizationInfo
	checkedInput []porcupine.Operation
}

// Check checks the operations (final reads included) for
// linearizability, per key, and the final values for lost acknowledged
// writes.
func Check(ops []Op, final map[Key]uint64, timeout time.Duration) Verdict {
	v := Verdict{Ops: len(ops)}
	observed := map[Key]map[uint64]bool{}
	for _, op := range ops {
		if !op.Write {
			if observed[op.Key] == nil {
				observed[op.Key] = map[uint64]bool{}
			}
			observed[op.Key][op.Value] = true
		}
	}
	// An unknown write that no read saw can be taken as never applied
	// (linearized at the end, where nothing observes it): dropping it
	// keeps the check exact and its search small.
	var in []porcupine.Operation
	for _, op := range ops {
		if op.Write && op.Return == Infinity && !observed[op.Key][op.Value] {
			v.Pruned++
			continue
		}
		var out any
		if !op.Write {
			out = op.Value
		}
		in = append(in, porcupine.Operation{ClientId: op.Client,
			Input: regInput{key: op.Key, write: op.Write, value: op.Value},
			Call:  op.Call, Output: out, Return: op.Return})
	}
	res, info := porcupine.CheckOperationsVerbose(registerModel, in, timeout)
	v.info, v.checkedInput = info, in
	switch res {
	case porcupine.Unknown:
		v.Unknown = true
	case porcupine.Illegal:
		v.Bad = badKeys(in, timeout)
	}
	v.Lost, v.Foreign = checkFinal(ops, final)
	return v
}

// badKeys checks key by key to name the keys that fail.
func badKeys(in []porcupine.Operation, timeout time.Duration) []Key {
	var bad []Key
	for _, part := range registerModel.Partition(in) {
		m := registerModel
		m.Partition = nil
		if porcupine.CheckOperationsTimeout(m, part, timeout) == porcupine.Illegal {
			bad = append(bad, part[0].Input.(regInput).key)
		}
	}
	return bad
}

// checkFinal compares each key's final value with its writes. A write may
// be the final value unless an acknowledged write was called after it
// returned; the initial zero may be final only when no write was
// acknowledged. A final value from a write that may not be final is a lost
// acknowledged write; one from no write at all is foreign.
func checkFinal(ops []Op, final map[Key]uint64) (lost, foreign []Key) {
	type keyInfo struct {
		lastAckCall int64 // latest call of an acknowledged write; -1 if none
		writes      map[uint64]Op
	}
	infos := map[Key]*keyInfo{}
	for k := range final {
		infos[k] = &keyInfo{lastAckCall: -1, writes: map[uint64]Op{}}
	}
	for _, op := range ops {
		ki := infos[op.Key]
		if ki == nil || !op.Write {
			continue
		}
		ki.writes[op.Value] = op
		if op.Return != Infinity {
			ki.lastAckCall = max(ki.lastAckCall, op.Call)
		}
	}
	for k, val := range final {
		ki := infos[k]
		if val == 0 {
			if ki.lastAckCall >= 0 {
				lost = append(lost, k)
			}
			continue
		}
		w, ok := ki.writes[val]
		if !ok || val == Torn {
			foreign = append(foreign, k)
			continue
		}
		if w.Return != Infinity && w.Return < ki.lastAckCall {
			lost = append(lost, k)
		}
	}
	sortKeys(lost)
	sortKeys(foreign)
	return lost, foreign
}

func sortKeys(ks []Key) {
	sort.Slice(ks, func(i, j int) bool {
		if ks[i].Vol != ks[j].Vol {
			return ks[i].Vol < ks[j].Vol
		}
		return ks[i].Block < ks[j].Block
	})
}

// Visualize writes porcupine's HTML visualization of the checked history.
func (v Verdict) Visualize(path string) error {
	return porcupine.VisualizePath(registerModel, v.info, path)
}
