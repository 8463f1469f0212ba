package ops

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/daemon"
	"cairn.io/cairn/mds/mdsclient"
)

// Exit codes of Run. Scripts branch on them; they never change meaning.
const (
	// ExitOK: the command succeeded; for status and checks, all is healthy.
	ExitOK = 0
	// ExitError: the command failed (the MDS refused it, a precondition
	// did not hold, the operator declined a confirmation).
	ExitError = 1
	// ExitUsage: bad command line (unknown command or flag, bad size,
	// malformed id) or an argument the MDS rejected as invalid.
	ExitUsage = 2
	// ExitUnhealthy: status or a check ran and found the cluster, a copyset
	// or a chunk not healthy (or could not verify it).
	ExitUnhealthy = 3
	// ExitInconsistent: check consistency found replicas whose data differ.
	ExitInconsistent = 4
	// ExitUnreachable: no MDS leader (or a needed chunkserver) answered
	// within the timeout.
	ExitUnreachable = 5
	// ExitNotFound: a volume, pool, copyset or chunkserver named on the
	// command line does not exist (or an offset was never written).
	ExitNotFound = 6
)

// DefaultMDS is the MDS address used when neither --mds nor CAIRN_MDS is set.
const DefaultMDS = "127.0.0.1:6700"

// EnvMDS names the environment variable holding default MDS addresses
// (comma-separated).
const EnvMDS = "CAIRN_MDS"

// The environment variables of the TLS flags.
const (
	EnvTLSCert  = "CAIRN_TLS_CERT"
	EnvTLSKey   = "CAIRN_TLS_KEY"
	EnvTLSCA    = "CAIRN_TLS_CA"
	EnvInsecure = "CAIRN_INSECURE"
)

// app holds one invocation's flags, streams and connections.
type app struct {
	stdin          io.Reader
	stdout, stderr io.Writer

	mdsAddrs []string
	output   string
	timeout  time.Duration
	verbose  bool
	tlsFiles certs.Files
	insecure bool
	identity *certs.Source

	log  *slog.Logger
	conn *mdsclient.Conn
	cs   *chunkServers

	// ran is set once a command's own code starts: an error before that
	// is a usage error.
	ran bool
}

// Run runs cairn-ops with args (without the program name), reading
// confirmations from the process's standard input, and returns the exit
// code.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return RunWithInput(ctx, args, os.Stdin, stdout, stderr)
}

// RunWithInput is Run with the stream that confirmations are read from.
func RunWithInput(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	a := &app{stdin: stdin, stdout: stdout, stderr: stderr}
	defer a.close()
	root := a.rootCommand()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	if len(args) == 0 {
		// Plain cairn-ops: the help, and the usage code (no command ran).
		_ = root.Help()
		return ExitUsage
	}
	err := root.ExecuteContext(ctx)
	if err == nil {
		return ExitOK
	}
	code := a.exitCode(err)
	var ee *exitError
	if errors.As(err, &ee) && ee.err == nil {
		return code // the command printed its own verdict
	}
	msg := errorMessage(err)
	fmt.Fprintf(stderr, "cairn-ops: %s\n", msg)
	if code == ExitUsage && !a.ran {
		fmt.Fprintln(stderr, "Run 'cairn-ops --help' for usage.")
	}
	if a.output == outputJSON {
		_ = writeJSON(stdout, map[string]any{"error": map[string]any{
			"code": codeName(code), "exit_code": code, "message": msg,
		}})
	}
	return code
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "cairn-ops",
		Short: "Inspect and operate a Cairn cluster",
		Long: `cairn-ops inspects and operates a Cairn cluster through its MDS and chunkservers.

Exit codes: 0 success (healthy), 1 command failed, 2 usage, 3 not healthy,
4 replicas inconsistent, 5 server unreachable, 6 not found.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       daemon.Version(),
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			return a.setup(cmd)
		},
	}
	root.SetVersionTemplate("cairn-ops {{.Version}}\n")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError(err) })
	pf := root.PersistentFlags()
	pf.StringSliceVar(&a.mdsAddrs, "mds", nil, "MDS addresses, comma-separated or repeated (env "+EnvMDS+", default "+DefaultMDS+")")
	pf.StringVarP(&a.output, "output", "o", outputTable, "output format: table or json")
	pf.DurationVar(&a.timeout, "timeout", 10*time.Second, "bound of each call, including retries across MDS leader changes")
	pf.BoolVarP(&a.verbose, "verbose", "v", false, "log connection events to stderr")
	pf.StringVar(&a.tlsFiles.Cert, "tls-cert", os.Getenv(EnvTLSCert), "certificate with the operator role (PEM; env "+EnvTLSCert+")")
	pf.StringVar(&a.tlsFiles.Key, "tls-key", os.Getenv(EnvTLSKey), "its private key (PEM; env "+EnvTLSKey+")")
	pf.StringVar(&a.tlsFiles.CA, "tls-ca", os.Getenv(EnvTLSCA), "authorities trusted for the cluster's servers (PEM; env "+EnvTLSCA+")")
	pf.BoolVar(&a.insecure, "insecure", os.Getenv(EnvInsecure) == "1", "talk to a cluster that runs without TLS (env "+EnvInsecure+"=1)")

	root.AddCommand(a.statusCommand(), a.listCommand(), a.queryCommand(), a.createCommand(),
		a.extendCommand(), a.deleteCommand(), a.updateCommand(), a.checkCommand(), a.duCommand(), a.renameCommand(),
		a.exportCommand(), a.importCommand(), a.rollbackCommand(), a.flattenCommand(), a.trashCommand(), a.restoreCommand(),
		a.topCommand())
	for _, c := range root.Commands() {
		if c.HasSubCommands() && c.RunE == nil && c.Run == nil {
			makeGroup(c)
		}
	}
	return root
}

// setup validates the global flags and prepares the connections; it runs
// before every command.
func (a *app) setup(cmd *cobra.Command) error {
	if a.output != outputTable && a.output != outputJSON {
		bad := a.output
		a.output = outputTable
		return usageError(fmt.Errorf("unknown output format %q: use table or json", bad))
	}
	if a.timeout <= 0 {
		return usageError(fmt.Errorf("--timeout %s must be positive", a.timeout))
	}
	level := slog.LevelError + 4 // silent
	if a.verbose {
		level = slog.LevelDebug
	}
	a.log = slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: level}))
	if cmd.Annotations[offline] != "" {
		return nil
	}
	addrs := a.mdsAddrs
	if !cmd.Flags().Changed("mds") {
		if env := strings.TrimSpace(os.Getenv(EnvMDS)); env != "" {
			addrs = []string{env}
		} else {
			addrs = []string{DefaultMDS}
		}
	}
	identity, err := certs.Choose(a.tlsFiles, a.insecure, a.log)
	if err != nil {
		return usageError(err)
	}
	a.identity = identity
	conn, err := mdsclient.Dial(addrs, mdsclient.Options{Logger: a.log, RetryBudget: a.timeout, TLS: identity})
	if err != nil {
		return usageError(fmt.Errorf("--mds: %w", err))
	}
	a.conn = conn
	a.mdsAddrs = conn.Addresses()
	a.cs = newChunkServers(identity)
	return nil
}

func (a *app) close() {
	if a.conn != nil {
		_ = a.conn.Close()
	}
	if a.cs != nil {
		a.cs.close()
	}
}

// runE wraps a command's body: it marks that argument parsing is over (so
// that later errors are not usage errors) and gives the body the command's
// context.
func (a *app) runE(fn func(ctx context.Context, cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		a.ran = true
		return fn(cmd.Context(), cmd, args)
	}
}

// callCtx bounds one call (with its retries) by --timeout.
func (a *app) callCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, a.timeout)
}

// makeGroup turns a command that only holds subcommands into one that,
// run alone, prints its help and fails with a usage error, and names an
// unknown subcommand.
func makeGroup(cmd *cobra.Command) {
	cmd.Args = cobra.ArbitraryArgs
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		var names []string
		for _, c := range cmd.Commands() {
			if c.IsAvailableCommand() {
				names = append(names, c.Name())
			}
		}
		if len(args) == 0 {
			_ = cmd.Help()
			return usageError(fmt.Errorf("%s needs one of: %s", commandName(cmd), strings.Join(names, ", ")))
		}
		return usageError(fmt.Errorf("unknown command %q for %s; want one of: %s", args[0], commandName(cmd), strings.Join(names, ", ")))
	}
}

// exactArgs is cobra.ExactArgs with a usage error naming the arguments.
func exactArgs(n int, names string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError(fmt.Errorf("%s takes %d argument(s): %s; got %d", commandName(cmd), n, names, len(args)))
		}
		return nil
	}
}

// commandName names a command as typed after cairn-ops ("create snapshot"):
// error lines already start with "cairn-ops: ".
func commandName(cmd *cobra.Command) string {
	return strings.TrimPrefix(cmd.CommandPath(), cmd.Root().Name()+" ")
}
