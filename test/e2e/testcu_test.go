package e2e

import (
	"bufio"
	"regexp"
	"strings"
)

var (
	testCUSuite = regexp.MustCompile(`^Suite: (\S+)`)
	testCUTest  = regexp.MustCompile(`^\s+Test: (\S+) \.\.\.(.*)$`)
)

// parseTestCU reads iscsi-test-cu's output into "Suite.Test" -> passed,
// failed or skipped. CUnit prints a skipped test as passed; libiscsi's
// "[SKIPPED]" line in between tells them apart. A test's own log lines may
// come between its name and its outcome, and the outcome may share a line
// with the next test's log.
func parseTestCU(out string) map[string]string {
	res := map[string]string{}
	var suite, cur string
	skipped := false
	outcome := func(s string) bool {
		s = strings.TrimSpace(s)
		if strings.HasPrefix(s, "passed") || strings.HasPrefix(s, "FAILED") {
			s = s[:6]
		}
		switch {
		case strings.HasPrefix(s, "["):
			return false
		case strings.HasSuffix(s, "passed"):
			res[cur] = "passed"
			if skipped {
				res[cur] = "skipped"
			}
		case strings.HasSuffix(s, "FAILED"):
			res[cur] = "failed"
		default:
			return false
		}
		cur = ""
		return true
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if m := testCUSuite.FindStringSubmatch(line); m != nil {
			suite = m[1]
			continue
		}
		if m := testCUTest.FindStringSubmatch(line); m != nil {
			cur = suite + "." + m[1]
			skipped = strings.Contains(m[2], "[SKIPPED]")
			outcome(m[2])
			continue
		}
		if cur == "" {
			continue
		}
		if strings.Contains(line, "[SKIPPED]") {
			skipped = true
		}
		outcome(line)
	}
	return res
}
