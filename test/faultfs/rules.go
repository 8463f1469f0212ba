package faultfs

import (
	"errors"
	"fmt"
	"regexp"
	"sync"
	"sync/atomic"
	"syscall"
)

// RuleID names an installed fault rule, for RemoveRule.
type RuleID uint64

// ErrBadRule is returned for a rule that cannot be installed: a pattern
// that does not compile, a negative count or an errno the operation cannot
// return.
var ErrBadRule = errors.New("faultfs: bad fault rule")

// op is the kind of file operation a rule fails.
type op int

const (
	opSync  op = iota // fsync and fdatasync of a file
	opWrite           // write and fallocate
	opRead            // read
	opCrash           // fsync and fdatasync of a file, cutting the power
)

// rule fails matching operations: after skip more, left more times (-1:
// until removed).
type rule struct {
	id    RuleID
	op    op
	re    *regexp.Regexp
	skip  int
	left  int
	errno syscall.Errno
	crash CrashOptions // opCrash only
}

// rules is the set of installed fault rules.
type rules struct {
	n    atomic.Int32 // installed rules, for the fast path
	mu   sync.Mutex
	next RuleID
	list []*rule
}

// add installs r with the pattern compiled; count 0 means until removed.
func (rs *rules) add(r rule, pattern string, count int) (RuleID, error) {
	if count < 0 {
		return 0, fmt.Errorf("%w: negative count %d", ErrBadRule, count)
	}
	re, err := regexp.Compile(pattern)
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrBadRule, err)
	}
	r.re, r.left = re, count
	if count == 0 {
		r.left = -1
	}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.next++
	r.id = rs.next
	rs.list = append(rs.list, &r)
	rs.n.Store(int32(len(rs.list)))
	return rs.next, nil
}

// remove uninstalls a rule; it reports whether the rule was installed.
func (rs *rules) remove(id RuleID) bool {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for i, r := range rs.list {
		if r.id == id {
			rs.list = append(rs.list[:i], rs.list[i+1:]...)
			rs.n.Store(int32(len(rs.list)))
			return true
		}
	}
	return false
}

// clear uninstalls every rule.
func (rs *rules) clear() {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.list = nil
	rs.n.Store(0)
}

// fire finds the first installed rule for o that matches path; if it has
// no matches left to skip, it uses up one of its counts and is returned.
// path is computed only when a rule is installed.
func (rs *rules) fire(o op, path func() string) *rule {
	if rs.n.Load() == 0 {
		return nil
	}
	p := path()
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for i, r := range rs.list {
		if r.op != o || !r.re.MatchString(p) {
			continue
		}
		if r.skip > 0 {
			r.skip--
			return nil
		}
		if r.left > 0 {
			r.left--
			if r.left == 0 {
				rs.list = append(rs.list[:i], rs.list[i+1:]...)
				rs.n.Store(int32(len(rs.list)))
			}
		}
		return r
	}
	return nil
}

// failure is the errno of the rule fire returns for o, or 0.
func (rs *rules) failure(o op, path func() string) syscall.Errno {
	if r := rs.fire(o, path); r != nil {
		return r.errno
	}
	return 0
}

// FailSync makes the next count fsync or fdatasync calls (0: every call
// until the rule is removed) on files whose path matches the regular
// expression pattern fail with EIO. Such a call does not sync: it puts the
// file's unsynced pages and size back to their state at the last successful
// sync and forgets them, so a retried fsync succeeds although the data is
// lost, as Linux reports a writeback error once. Paths are relative to the
// mount root, slash-separated, without a leading slash ("wal/00001.wal");
// "" matches every file.
func (f *FS) FailSync(pattern string, count int) (RuleID, error) {
	return f.rules.add(rule{op: opSync, errno: syscall.EIO}, pattern, count)
}

// FailWrites makes the next count writes and fallocates (0: every one until
// the rule is removed) on files matching pattern fail with errno, which must
// be EIO or ENOSPC (0 means EIO). A failed request writes nothing. The
// kernel splits a large write into requests of at most 1 MiB; when a later
// one fails the write returns the bytes of the earlier ones.
func (f *FS) FailWrites(pattern string, count int, errno syscall.Errno) (RuleID, error) {
	if errno == 0 {
		errno = syscall.EIO
	}
	if errno != syscall.EIO && errno != syscall.ENOSPC {
		return 0, fmt.Errorf("%w: a write can fail with EIO or ENOSPC, not %v", ErrBadRule, errno)
	}
	return f.rules.add(rule{op: opWrite, errno: errno}, pattern, count)
}

// FailReads makes the next count reads (0: every read until the rule is
// removed) of files matching pattern fail with EIO.
func (f *FS) FailReads(pattern string, count int) (RuleID, error) {
	return f.rules.add(rule{op: opRead, errno: syscall.EIO}, pattern, count)
}

// CrashAtSync arms a power cut at the nth fsync or fdatasync (n >= 1) of a
// file whose path matches pattern: that call does not sync and fails with
// EIO, and the filesystem crashes at that instant as by Crash(opts). So the
// cut lands exactly between the writes that call would have made durable
// and their sync. The processes using the mount see EIO from then on; wait
// for the crash with WaitCrash, then kill them and Restart.
func (f *FS) CrashAtSync(pattern string, n int, opts CrashOptions) (RuleID, error) {
	if n < 1 {
		return 0, fmt.Errorf("%w: CrashAtSync needs n >= 1, not %d", ErrBadRule, n)
	}
	if err := opts.validate(); err != nil {
		return 0, fmt.Errorf("%w: %w", ErrBadRule, err)
	}
	return f.rules.add(rule{op: opCrash, errno: syscall.EIO, skip: n - 1, crash: opts}, pattern, 1)
}

// RemoveRule uninstalls a rule and reports whether it was still installed
// (a rule with a count is removed by itself once used up).
func (f *FS) RemoveRule(id RuleID) bool { return f.rules.remove(id) }

// ClearRules uninstalls every fault rule.
func (f *FS) ClearRules() { f.rules.clear() }
