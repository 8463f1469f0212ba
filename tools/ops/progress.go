package ops

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// Progress on a terminal: bars and spinners go to stderr when it is a
// terminal, never into pipes or logs, and never to stdout, which carries
// the result (or an exported image).

// terminal returns stderr when it is a terminal.
func (a *app) terminal() (*os.File, bool) {
	f, ok := a.stderr.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil, false
	}
	return f, true
}

// progressBar returns a bar counting chunks on stderr when it is a
// terminal, else nil.
func (a *app) progressBar(total int, desc string) *progressbar.ProgressBar {
	f, ok := a.terminal()
	if !ok || total == 0 {
		return nil
	}
	return progressbar.NewOptions(total,
		progressbar.OptionSetWriter(io.Writer(f)),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionShowCount(),
		progressbar.OptionShowIts(),
		progressbar.OptionSetItsString("chunks"),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionSetPredictTime(true),
	)
}

// byteBar returns a bar counting bytes on stderr when it is a terminal,
// else nil.
func (a *app) byteBar(total int64, desc string) *progressbar.ProgressBar {
	f, ok := a.terminal()
	if !ok || total == 0 {
		return nil
	}
	return progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(io.Writer(f)),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionShowBytes(true),
		progressbar.OptionShowTotalBytes(true),
		progressbar.OptionSetWidth(10),
		progressbar.OptionThrottle(65*time.Millisecond),
		progressbar.OptionShowCount(),
		progressbar.OptionOnCompletion(func() { fmt.Fprintln(f) }),
		progressbar.OptionSpinnerType(14),
		progressbar.OptionFullWidth(),
		progressbar.OptionSetRenderBlankState(true),
	)
}

// progress is what a wait knows at one poll: done of total when the MDS
// gives figures (total 0 when it gives none: a spinner then), and a line
// saying what is waited for, with whatever else is known.
type progress struct {
	done, total int64
	desc        string
}

// waitUntil polls until poll says done, ctx ends or wait passes (then it
// returns expired()), every interval. On a terminal it shows the wait: a bar
// of done of total, or a spinner while poll gives no total, described by
// poll's line (the figures poll gives with done are the last shown). poll
// is told whether anything is shown, so that it fetches figures only for a
// terminal.
func (a *app) waitUntil(ctx context.Context, wait, interval time.Duration, poll func(shown bool) (bool, progress, error), expired func() error) error {
	deadline := time.Now().Add(wait)
	f, shown := a.terminal()
	var bar *progressbar.ProgressBar
	var barTotal int64
	defer func() {
		if bar != nil {
			_ = bar.Finish()
			fmt.Fprintln(f)
		}
	}()
	for {
		done, p, err := poll(shown)
		if err != nil || done {
			if done && bar != nil && barTotal > 0 && p.total > 0 {
				_ = bar.Set64(p.done) // the last figures, when poll gives them
			}
			return err
		}
		if shown {
			if bar == nil || (barTotal > 0) != (p.total > 0) {
				if bar != nil {
					_ = bar.Finish()
					fmt.Fprintln(f)
				}
				bar, barTotal = newWaitBar(f, p), p.total
			}
			bar.Describe(p.desc)
			if p.total > 0 {
				if p.total != barTotal {
					bar.ChangeMax64(p.total)
					barTotal = p.total
				}
				_ = bar.Set64(p.done)
			} else {
				_ = bar.Add(1)
			}
		}
		if time.Now().After(deadline) {
			return expired()
		}
		if err := sleepCtx(ctx, interval); err != nil {
			return err
		}
	}
}

// newWaitBar is a bar counting p's figures, or a spinner without them.
func newWaitBar(f *os.File, p progress) *progressbar.ProgressBar {
	if p.total > 0 {
		return progressbar.NewOptions64(p.total,
			progressbar.OptionSetWriter(io.Writer(f)),
			progressbar.OptionSetDescription(p.desc),
			progressbar.OptionShowCount(),
			progressbar.OptionShowElapsedTimeOnFinish(),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionSetRenderBlankState(true),
		)
	}
	return progressbar.NewOptions(-1,
		progressbar.OptionSetWriter(io.Writer(f)),
		progressbar.OptionSetDescription(p.desc),
		progressbar.OptionSpinnerType(14),
		progressbar.OptionShowElapsedTimeOnFinish(),
		progressbar.OptionThrottle(100*time.Millisecond),
	)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
