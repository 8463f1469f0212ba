package ops

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"cairn.io/cairn/internal/certs"
)

// offline marks commands that need no connection to the cluster.
const offline = "offline"

// createCertCommand issues a certificate from a CA kept in a directory
// (made on first use): enough for a small cluster; larger sites issue from
// their own PKI.
func (a *app) createCertCommand() *cobra.Command {
	var (
		caDir, outDir string
		roles, hosts  []string
		valid         time.Duration
	)
	cmd := &cobra.Command{
		Use:   "cert NAME --role ROLE[,ROLE] [--host HOST]... --ca-dir DIR",
		Short: "Issue a certificate for a Cairn process from a CA kept in --ca-dir (made on first use)",
		Long: `Issue a certificate and key for a Cairn process, written as NAME.crt and NAME.key
in --out (default: --ca-dir), signed by the CA in --ca-dir (ca.crt, ca.key; created
on first use). Roles: mds, chunkserver, client (gateway, CSI node), operator
(cairn-ops, CSI controller). Servers (mds, chunkserver) need --host for every
name and address they are reached at. Give the process --tls-cert NAME.crt
--tls-key NAME.key --tls-ca ca.crt; see docs/security.md.`,
		Args:        exactArgs(1, "NAME"),
		Annotations: map[string]string{offline: "true"},
		RunE: a.runE(func(_ context.Context, _ *cobra.Command, args []string) error {
			name := args[0]
			if strings.ContainsAny(name, `/\`) || name == "ca" {
				return usageError(fmt.Errorf("NAME %q: want a plain file name other than ca", name))
			}
			if caDir == "" {
				return usageError(fmt.Errorf("--ca-dir is required"))
			}
			var rs []certs.Role
			for _, r := range roles {
				role := certs.Role(strings.TrimSpace(r))
				found := false
				for _, known := range certs.Roles {
					found = found || known == role
				}
				if !found {
					return usageError(fmt.Errorf("--role %q: want one of %v", r, certs.Roles))
				}
				rs = append(rs, role)
			}
			if len(rs) == 0 {
				return usageError(fmt.Errorf("--role is required (one of %v)", certs.Roles))
			}
			if outDir == "" {
				outDir = caDir
			}
			if err := os.MkdirAll(outDir, 0o700); err != nil {
				return err
			}
			ca, err := certs.OpenCA(caDir, "Cairn CA")
			if err != nil {
				return err
			}
			f, err := ca.Issue(outDir, name, certs.Request{Name: name, Roles: rs, Hosts: hosts, Valid: valid})
			if err != nil {
				return err
			}
			if a.output == outputJSON {
				return writeJSON(a.stdout, map[string]any{"cert": f.Cert, "key": f.Key, "ca": f.CA, "roles": rs, "hosts": hosts})
			}
			fmt.Fprintf(a.stdout, "issued %s (roles %v, valid until %s) signed by %s\n  --tls-cert %s --tls-key %s --tls-ca %s\n",
				name, rs, time.Now().Add(valid).UTC().Format(time.DateOnly), filepath.Join(caDir, "ca.crt"), f.Cert, f.Key, f.CA)
			return nil
		}),
	}
	cmd.Flags().StringVar(&caDir, "ca-dir", "", "directory of the CA (ca.crt, ca.key), created with a new CA if absent")
	cmd.Flags().StringVar(&outDir, "out", "", "directory the certificate and key are written to (default --ca-dir)")
	cmd.Flags().StringSliceVar(&roles, "role", nil, "roles: mds, chunkserver, client, operator (comma-separated or repeated)")
	cmd.Flags().StringSliceVar(&hosts, "host", nil, "DNS names and IP addresses a server is reached at (repeated)")
	cmd.Flags().DurationVar(&valid, "valid", 365*24*time.Hour, "how long the certificate is valid")
	return cmd
}
