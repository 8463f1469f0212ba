package daemon

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"
)

// Parse reads a daemon's settings into fs, each from the first place that
// has it: the command line, the --config file (YAML or JSON; keys are flag
// names, lists become comma-separated values), the environment variable
// CAIRN_<FLAG> (upper case, dashes as underscores: --data-dir is
// CAIRN_DATA_DIR), the flag's default. It adds the --config flag. An unknown
// key in the file, or a value a flag refuses, is an error naming where it
// came from.
func Parse(fs *flag.FlagSet, args []string) error {
	config := fs.String("config", "", "YAML or JSON file of settings, keys being flag names (the command line wins over it, it over CAIRN_* variables)")
	fs.Usage = func() { PrintUsage(fs) }
	if err := fs.Parse(args); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *config != "" {
		if err := applyConfigFile(fs, *config, set); err != nil {
			return err
		}
	}
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || set[f.Name] || f.Name == "config" {
			return
		}
		name := EnvName(f.Name)
		v, ok := os.LookupEnv(name)
		if !ok || v == "" {
			return
		}
		if serr := f.Value.Set(v); serr != nil {
			err = fmt.Errorf("environment %s=%q (--%s): %w", name, v, f.Name, serr)
		}
	})
	return err
}

// EnvName is the environment variable of a flag: CAIRN_ and the flag's
// name in upper case with dashes as underscores.
func EnvName(flagName string) string {
	return "CAIRN_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// applyConfigFile sets the flags a config file names that set does not
// hold (set on the command line), and adds them to set.
func applyConfigFile(fs *flag.FlagSet, path string, set map[string]bool) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		f := fs.Lookup(k)
		if f == nil || k == "config" {
			return fmt.Errorf("config %s: unknown setting %q", path, k)
		}
		if set[k] {
			continue
		}
		var s string
		switch x := m[k].(type) {
		case []any:
			parts := make([]string, len(x))
			for i, p := range x {
				parts[i] = fmt.Sprint(p)
			}
			s = strings.Join(parts, ",")
		case float64:
			s = fmt.Sprintf("%.0f", x)
			if x != float64(int64(x)) {
				s = fmt.Sprint(x)
			}
		default:
			s = fmt.Sprint(x)
		}
		if err := f.Value.Set(s); err != nil {
			return fmt.Errorf("config %s: %s: %w", path, k, err)
		}
		set[k] = true
	}
	return nil
}

// PrintUsage writes fs's help to its output in the style of cairn-ops:
// "Usage: NAME [flags]", then each flag as --name TYPE with its meaning and
// default, and where settings come from.
func PrintUsage(fs *flag.FlagSet) {
	w := fs.Output()
	fmt.Fprintf(w, "Usage: %s [flags]\n\nFlags:\n", fs.Name())
	fs.VisitAll(func(f *flag.Flag) {
		typ, usage := flag.UnquoteUsage(f)
		line := "  --" + f.Name
		if typ != "" {
			line += " " + typ
		}
		fmt.Fprintln(w, line)
		switch f.DefValue {
		case "", "false", "0", "0s", "0B":
		default:
			if !strings.Contains(usage, "(default") {
				usage += fmt.Sprintf(" (default %s)", f.DefValue)
			}
		}
		fmt.Fprintf(w, "      %s\n", usage)
	})
	fmt.Fprintf(w, "\nEvery flag may also come from the --config file or from the environment as CAIRN_<FLAG> (--data-dir: CAIRN_DATA_DIR).\n")
}
