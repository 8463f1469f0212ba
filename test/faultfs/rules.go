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
)

func (o op) String() string {
	return [...]string{"sync", "write", "read"}[o]
}

// rule fails matching operations: left more times (-1: until removed).
type rule struct {
	id    RuleID
	op    op
	re    *regexp.Regexp
	left  int
	errno syscall.Errno
}

// rules is the set of installed fault rules.
type rules struct {
	n    atomic.Int32 // installed rules, for the fast path
	mu   sync.Mutex
	next RuleID
	list []*rule
}

// add installs a rule; count 0 means until removed.
func (rs *rules) add(o op, pattern string, count int, errno syscall.Errno) (RuleID, error) {
	if count < 0 {
		return 0, fmt.Errorf("%w: negative count %d", ErrBadRule, count)
	}
	re, err := regexp.Compile(pattern)
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrBadRule, err)
	}
	left := count
	if count == 0 {
		left = -1
	}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.next++
	rs.list = append(rs.list, &rule{id: rs.next, op: o, re: re, left: left, errno: errno})
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

// fire returns the errno of the first installed rule for o that matches
// path (and uses up one of its counts), or 0. path is computed only when a
// rule is installed.
func (rs *rules) fire(o op, path func() string) syscall.Errno {
	if rs.n.Load() == 0 {
		return 0
	}
	p := path()
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for i, r := range rs.list {
		if r.op != o || !r.re.MatchString(p) {
			continue
		}
		if r.left > 0 {
			r.left--
			if r.left == 0 {
				rs.list = append(rs.list[:i], rs.list[i+1:]...)
				rs.n.Store(int32(len(rs.list)))
			}
		}
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
	return f.rules.add(opSync, pattern, count, syscall.EIO)
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
	return f.rules.add(opWrite, pattern, count, errno)
}

// FailReads makes the next count reads (0: every read until the rule is
// removed) of files matching pattern fail with EIO.
func (f *FS) FailReads(pattern string, count int) (RuleID, error) {
	return f.rules.add(opRead, pattern, count, syscall.EIO)
}

// RemoveRule uninstalls a rule and reports whether it was still installed
// (a rule with a count is removed by itself once used up).
func (f *FS) RemoveRule(id RuleID) bool { return f.rules.remove(id) }

// ClearRules uninstalls every fault rule.
func (f *FS) ClearRules() { f.rules.clear() }
