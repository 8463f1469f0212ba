package ops

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Output formats.
const (
	outputTable = "table"
	outputJSON  = "json"
)

// result is what every command prints: JSON through its struct tags, or a
// table for people.
type result interface {
	writeTable(t *table)
}

// emit prints r in the selected format.
func (a *app) emit(r result) error { return a.emitTo(a.stdout, r) }

// emitTo prints r to w (standard error when standard output carries data).
func (a *app) emitTo(w io.Writer, r result) error {
	if a.output == outputJSON {
		return writeJSON(w, r)
	}
	t := newTable(w)
	r.writeTable(t)
	return t.flush()
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table writes aligned columns; blank lines and plain lines pass through.
type table struct {
	tw  *tabwriter.Writer
	err error
}

func newTable(w io.Writer) *table {
	return &table{tw: tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)}
}

// row writes one row of cells.
func (t *table) row(cells ...any) {
	parts := make([]string, len(cells))
	for i, c := range cells {
		parts[i] = fmt.Sprint(c)
	}
	t.write(strings.Join(parts, "\t") + "\n")
}

// line writes a line that takes no part in column alignment of the rows
// around it (it ends the current block of columns).
func (t *table) line(format string, args ...any) {
	if err := t.tw.Flush(); err != nil && t.err == nil {
		t.err = err
	}
	t.write(fmt.Sprintf(format, args...) + "\n")
	if err := t.tw.Flush(); err != nil && t.err == nil {
		t.err = err
	}
}

func (t *table) write(s string) {
	if _, err := io.WriteString(t.tw, s); err != nil && t.err == nil {
		t.err = err
	}
}

func (t *table) flush() error {
	if err := t.tw.Flush(); err != nil && t.err == nil {
		t.err = err
	}
	return t.err
}

// formatBytes prints a byte count for people: in the largest binary unit
// that keeps it at least 1, whole when it is whole and with one decimal
// otherwise ("10GiB", "755.9GiB", "512B"), in the spelling Cairn's commands
// read sizes in (internal/units). Measured sizes such as disk capacity are
// rarely whole, so units.FormatBytes, which prefers an exact smaller unit,
// would print them in KiB.
func formatBytes(n uint64) string {
	names := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	i := 0
	for i < len(names)-1 && n>>(10*(i+1)) > 0 {
		i++
	}
	if i == 0 {
		return strconv.FormatUint(n, 10) + "B"
	}
	unit := uint64(1) << (10 * i)
	if n%unit == 0 {
		return strconv.FormatUint(n/unit, 10) + names[i]
	}
	return strconv.FormatFloat(float64(n)/float64(unit), 'f', 1, 64) + names[i]
}

// formatUnix prints a Unix time in UTC, RFC 3339; "-" for zero.
func formatUnix(sec int64) string {
	if sec == 0 {
		return "-"
	}
	return time.Unix(sec, 0).UTC().Format(time.RFC3339)
}

// dash prints "-" for an empty string.
func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// idOrDash prints an id, "-" for 0.
func idOrDash(id uint64) string {
	if id == 0 {
		return "-"
	}
	return strconv.FormatUint(id, 10)
}

// percent prints part/whole as a whole percentage, 100 when whole is 0.
func percent(part, whole uint64) uint32 {
	if whole == 0 {
		return 100
	}
	return uint32(part * 100 / whole)
}
