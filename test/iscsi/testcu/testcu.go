package testcu

import (
	"bufio"
	"regexp"
	"strings"
)

// Outcomes of one conformance test.
const (
	Passed  = "passed"
	Failed  = "failed"
	Skipped = "skipped"
)

var (
	suiteRe = regexp.MustCompile(`^Suite: (\S+)`)
	testRe  = regexp.MustCompile(`^\s+Test: (\S+) \.\.\.(.*)$`)
)

// Parse reads iscsi-test-cu's verbose output into test -> outcome.
// CUnit reports a skipped test as passed; libiscsi prints "[SKIPPED]" in
// its log, which is what tells the two apart.
func Parse(out string) map[string]string {
	res := make(map[string]string)
	var suite, cur string
	skipped := false
	finish := func(line string) bool {
		// The outcome follows the test's own log output on the same
		// line ("...passed"), or starts a line that may go on with log
		// output of what runs next ("passed    [FAILED] PRIN ...").
		s := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(s, "passed"), strings.HasPrefix(s, "FAILED"):
			s = s[:6]
		}
		switch {
		case strings.HasSuffix(s, "passed") && !strings.HasPrefix(s, "["):
			if skipped {
				res[cur] = Skipped
			} else {
				res[cur] = Passed
			}
		case strings.HasSuffix(s, "FAILED") && !strings.HasPrefix(s, "["):
			res[cur] = Failed
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
		if m := suiteRe.FindStringSubmatch(line); m != nil {
			suite = m[1]
			continue
		}
		if m := testRe.FindStringSubmatch(line); m != nil {
			cur = suite + "." + m[1]
			skipped = strings.Contains(m[2], "[SKIPPED]")
			finish(m[2])
			continue
		}
		if cur == "" {
			continue
		}
		if strings.Contains(line, "[SKIPPED]") {
			skipped = true
		}
		finish(line)
	}
	return res
}
