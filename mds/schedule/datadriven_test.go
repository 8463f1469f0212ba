package schedule

import (
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/cockroachdb/datadriven"
)

// TestPlanScenarios runs the scenarios in testdata/plan: small clusters
// written out by hand, what the schedulers plan for them, and what the
// cluster looks like after the operators are carried out. Commands:
//
//	chunkservers         one per input line: ID zone=Z [pool=P] [offline]
//	                     [down] [retiring] [retired] [full] [used=F]
//	copysets             one per input line: POOL:ID voters=A,B,C
//	                     [leader=L] [learners=..] [replicas=N] [epoch=N]
//	                     [busy] [broken=..] [avoid=..] [pinned]
//	mark ID STATE...     changes a chunkserver (the same words)
//	running ID=N...      operators already running per chunkserver
//	plan [max-ops=N] [no-balance]
//	                     prints the operators and blocked copysets
//	apply                carries out the last plan, elects leaders for
//	                     copysets whose leader is offline, prints copysets
//	converge [no-balance]
//	                     plans and applies until nothing is planned
//
// go test ./mds/schedule -run TestPlanScenarios -rewrite rewrites the
// expected output.
func TestPlanScenarios(t *testing.T) {
	datadriven.Walk(t, "testdata/plan", func(t *testing.T, path string) {
		c := &cluster{}
		var last []Op
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			switch d.Cmd {
			case "chunkservers":
				c.in.ChunkServers = nil
				for _, line := range lines(d.Input) {
					f := strings.Fields(line)
					s := ChunkServer{ID: parseID(t, f[0]), PhysPool: 1, Online: true}
					markChunkServer(t, &s, f[1:])
					c.in.ChunkServers = append(c.in.ChunkServers, s)
				}
				return ""
			case "copysets":
				c.in.Copysets = nil
				for _, line := range lines(d.Input) {
					c.in.Copysets = append(c.in.Copysets, parseCopyset(t, line))
				}
				return ""
			case "mark":
				var f []string
				for _, a := range d.CmdArgs {
					f = append(f, a.String())
				}
				s := c.cs(parseID(t, f[0]))
				if s == nil {
					t.Fatalf("%s: no chunkserver %s", d.Pos, f[0])
				}
				markChunkServer(t, s, f[1:])
				return ""
			case "running":
				c.in.Running = map[uint64]int{}
				for _, a := range d.CmdArgs {
					n, err := strconv.Atoi(a.Vals[0])
					if err != nil {
						t.Fatalf("%s: %v", d.Pos, err)
					}
					c.in.Running[parseID(t, a.Key)] = n
				}
				return ""
			case "plan":
				ops, blocked := Plan(c.in, limitsOf(t, d))
				last = ops
				return formatPlan(ops, blocked)
			case "apply":
				c.apply(t, last)
				last = nil
				c.elect()
				return c.format()
			case "converge":
				rounds, blocked := c.converge(t, limitsOf(t, d))
				return fmt.Sprintf("settled after %d rounds\n%s%s", rounds, formatPlan(nil, blocked), c.format())
			}
			t.Fatalf("%s: unknown command %q", d.Pos, d.Cmd)
			return ""
		})
	})
}

func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

func parseID(t *testing.T, s string) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatalf("bad id %q", s)
	}
	return n
}

func parseIDs(t *testing.T, s string) []uint64 {
	t.Helper()
	var out []uint64
	for _, p := range strings.Split(s, ",") {
		out = append(out, parseID(t, p))
	}
	return out
}

// markChunkServer applies words such as "zone=2", "down" or "online" to s.
func markChunkServer(t *testing.T, s *ChunkServer, words []string) {
	t.Helper()
	for _, w := range words {
		k, v, _ := strings.Cut(w, "=")
		switch k {
		case "zone":
			s.Zone = uint32(parseID(t, v))
		case "pool":
			s.PhysPool = uint32(parseID(t, v))
		case "online":
			s.Online, s.Down = true, false
		case "offline":
			s.Online = false
		case "down":
			s.Online, s.Down = false, true
		case "retiring":
			s.Retiring = true
		case "retired":
			s.Retired = true
		case "full":
			s.Full = true
		case "used":
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("bad used %q", v)
			}
			s.Used = f
		default:
			t.Fatalf("unknown chunkserver word %q", w)
		}
	}
}

func parseCopyset(t *testing.T, line string) Copyset {
	t.Helper()
	f := strings.Fields(line)
	pool, id, ok := strings.Cut(f[0], ":")
	if !ok {
		t.Fatalf("copyset %q: want POOL:ID", f[0])
	}
	c := Copyset{Pool: uint32(parseID(t, pool)), PhysPool: 1, ID: uint32(parseID(t, id)), Replicas: 3, ConfEpoch: 1}
	for _, w := range f[1:] {
		k, v, _ := strings.Cut(w, "=")
		switch k {
		case "voters":
			c.Voters = parseIDs(t, v)
		case "learners":
			c.Learners = parseIDs(t, v)
		case "leader":
			c.Leader = parseID(t, v)
		case "replicas":
			c.Replicas = int(parseID(t, v))
		case "epoch":
			c.ConfEpoch = parseID(t, v)
		case "busy":
			c.Busy = true
		case "broken":
			c.Broken = parseIDs(t, v)
		case "avoid":
			c.Avoid = parseIDs(t, v)
		case "pinned":
			c.Pinned = true
		default:
			t.Fatalf("unknown copyset word %q", w)
		}
	}
	if c.Leader == 0 && len(c.Voters) > 0 {
		c.Leader = c.Voters[0]
	}
	return c
}

func limitsOf(t *testing.T, d *datadriven.TestData) Limits {
	var lim Limits
	if d.HasArg("max-ops") {
		d.ScanArgs(t, "max-ops", &lim.MaxOpsPerChunkServer)
	}
	lim.NoBalance = d.HasArg("no-balance")
	return lim
}

func formatPlan(ops []Op, blocked []Blocked) string {
	var b strings.Builder
	for _, op := range ops {
		fmt.Fprintf(&b, "%s %d on %d:%d at epoch %d (%s)\n", op.Kind, op.Target, op.Pool, op.Copyset, op.ConfEpoch, op.Reason)
	}
	for _, bl := range blocked {
		fmt.Fprintf(&b, "blocked %d:%d: %s\n", bl.Pool, bl.Copyset, bl.Reason)
	}
	if b.Len() == 0 {
		return "nothing to do\n"
	}
	return b.String()
}

// format lists the copysets: voters (the leader starred), learners, epoch.
func (c *cluster) format() string {
	var b strings.Builder
	for _, cs := range c.in.Copysets {
		var vs []string
		for _, v := range cs.Voters {
			s := strconv.FormatUint(v, 10)
			if v == cs.Leader {
				s += "*"
			}
			vs = append(vs, s)
		}
		fmt.Fprintf(&b, "%d:%d voters=%s", cs.Pool, cs.ID, strings.Join(vs, ","))
		if len(cs.Learners) > 0 {
			fmt.Fprintf(&b, " learners=%v", cs.Learners)
		}
		fmt.Fprintf(&b, " epoch=%d\n", cs.ConfEpoch)
	}
	return b.String()
}
