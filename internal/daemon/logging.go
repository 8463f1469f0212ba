package daemon

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// LogLevel is the level every logger made by LogFlags.Logger logs at. It
// may change while the process runs: the metrics listener's /debug/loglevel
// reads and sets it (httpdebug).
var LogLevel slog.LevelVar

// LogFlags are the logging flags every daemon has.
type LogFlags struct {
	level, format *string
}

// AddLogFlags registers --log-level (env CAIRN_LOG_LEVEL) and --log-format
// (env CAIRN_LOG_FORMAT) on fs.
func AddLogFlags(fs *flag.FlagSet) *LogFlags {
	return &LogFlags{
		level: fs.String("log-level", EnvOr("CAIRN_LOG_LEVEL", "info"),
			"debug, info, warn or error (env CAIRN_LOG_LEVEL); changeable at run time through the metrics listener's /debug/loglevel"),
		format: fs.String("log-format", EnvOr("CAIRN_LOG_FORMAT", "text"), "text (key=value) or json, one object per line (env CAIRN_LOG_FORMAT)"),
	}
}

// Format is the --log-format asked for, lower case ("text" or "json" once
// Logger accepted it), for passing on to child processes.
func (f *LogFlags) Format() string { return strings.ToLower(*f.format) }

// Level is the --log-level asked for, lower case, for passing on to child
// processes.
func (f *LogFlags) Level() string { return strings.ToLower(*f.level) }

// Logger returns the logger the flags ask for, writing to w, and sets
// LogLevel; a bad value is an error naming its flag.
func (f *LogFlags) Logger(w io.Writer) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(*f.level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	LogLevel.Set(l)
	opts := &slog.HandlerOptions{Level: &LogLevel}
	switch strings.ToLower(*f.format) {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", *f.format)
}
