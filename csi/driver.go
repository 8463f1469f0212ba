package csi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/csi/attach/kernelnbd"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/mds/mdsclient"
)

// DriverName is the name the driver registers under.
const DriverName = "csi.cairn.io"

// Modes the driver runs in.
const (
	ModeController = "controller"
	ModeNode       = "node"
	ModeAll        = "all"
)

// Config configures a driver.
type Config struct {
	// Endpoint is where the CSI services listen: unix:///path/csi.sock (or
	// a bare path).
	Endpoint string
	// MDSAddrs are the MDS addresses.
	MDSAddrs []string
	// NodeID identifies this node (node and all modes): the name the
	// controller publishes volumes to.
	NodeID string
	// Mode is controller (default), node or all.
	Mode string
	// StateDir keeps the node's attachments (node and all modes); it must
	// outlive the process (a host path in Kubernetes) so that a restarted
	// node plugin finds the volumes it staged.
	StateDir string
	// Topology is the node's topology (zone=a), reported by NodeGetInfo
	// with TopologyPrefix and registered with the MDS.
	Topology map[string]string
	// DefaultFsType is the file system of mount volumes whose capability
	// names none (default ext4; Kubernetes passes the StorageClass's
	// csi.storage.k8s.io/fstype, so this matters to other callers).
	DefaultFsType string
	// Attach is how the node attaches volumes: AttachFUSE (default),
	// AttachNBD (the kernel's nbd driver; New fails when the nbd module is
	// not loaded), AttachISCSI (an iSCSI target on the loopback and the
	// kernel's initiator through open-iscsi; New fails without the
	// iscsi_tcp module, iscsiadm or iscsid) or AttachAuto (nbd where the
	// module is loaded, else iscsi where it can run, else fuse). Each
	// volume keeps the mode it was staged with.
	Attach string
	// ReattachTimeout is how long the kernel holds the IO of an nbd- or
	// iscsi-attached volume whose attach process is gone (the plugin's
	// container restarted) for a new one to take the device over, before
	// failing it (default attach.DefaultReattachTimeout). For iscsi it is
	// the session's node.session.timeo.replacement_timeout.
	ReattachTimeout time.Duration
	// ISCSIAdm is the iscsiadm command of the iscsi attach (default
	// attach.DefaultISCSIAdm): a name in PATH or a path, for instance of
	// a wrapper that runs the host's.
	ISCSIAdm string
	// Executable is the cairn-csi binary the node runs as attach processes
	// (default: this process's executable).
	Executable string
	// Version is reported by GetPluginInfo.
	Version string
	// CallTimeout bounds each call the driver makes to the MDS (default
	// 30s, shortened by the caller's deadline).
	CallTimeout time.Duration
	// TLS is the driver's identity towards the MDS (the controller needs
	// the operator role, the node the client role; attach processes get
	// the same files); nil: plaintext.
	TLS *certs.Source
	// Logger receives the driver's logs (default slog.Default()).
	Logger *slog.Logger
}

// Driver is a running CSI driver.
type Driver struct {
	cfg  Config
	log  *slog.Logger
	mds  *mdsclient.Conn
	srv  *grpc.Server
	lis  net.Listener
	path string

	// volumeLocks serialises calls on one volume name, as the CSI
	// specification asks of a plugin that may see retried calls.
	volumeLocks sync.Map // name -> *sync.Mutex

	// Controller mode: wakes the flattener of clones (clones.go), closed
	// when it ends.
	flattenKick chan struct{}
	flattenDone chan struct{}

	// Node mode: closed when the watch of attachments ends (takeover.go).
	watchDone chan struct{}

	// Node mode.
	mounter *mount.SafeFormatAndMount
	exec    utilexec.Interface
	exe     string
	cancel  context.CancelFunc
}

// New checks cfg and connects to the MDS; Start serves.
func New(cfg Config) (*Driver, error) {
	if cfg.Mode == "" {
		cfg.Mode = ModeController
	}
	switch cfg.Mode {
	case ModeController, ModeNode, ModeAll:
	default:
		return nil, fmt.Errorf("csi: mode %q: want controller, node or all", cfg.Mode)
	}
	d := &Driver{cfg: cfg}
	if cfg.Mode != ModeController {
		if err := d.setUpNode(); err != nil {
			return nil, err
		}
		cfg = d.cfg // with what setUpNode filled in
	}
	if cfg.Endpoint == "" {
		return nil, errors.New("csi: an endpoint is required (unix:///path/csi.sock)")
	}
	if len(cfg.MDSAddrs) == 0 {
		return nil, errors.New("csi: at least one MDS address is required")
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	path, err := socketPath(cfg.Endpoint)
	if err != nil {
		return nil, err
	}
	conn, err := mdsclient.Dial(cfg.MDSAddrs, mdsclient.Options{Logger: cfg.Logger, TLS: cfg.TLS})
	if err != nil {
		return nil, fmt.Errorf("csi: dial MDS: %w", err)
	}
	d.cfg, d.log, d.mds, d.path = cfg, cfg.Logger.With("component", "csi"), conn, path
	return d, nil
}

// setUpNode checks the node mode's configuration.
func (d *Driver) setUpNode() error {
	cfg := &d.cfg
	if cfg.NodeID == "" {
		return errors.New("csi: node mode needs a node id (--node-id)")
	}
	if cfg.StateDir == "" || !filepath.IsAbs(cfg.StateDir) {
		return fmt.Errorf("csi: node mode needs an absolute state directory, not %q (--state-dir)", cfg.StateDir)
	}
	cfg.StateDir = filepath.Clean(cfg.StateDir)
	switch cfg.DefaultFsType {
	case "":
		cfg.DefaultFsType = "ext4"
	case "ext4", "xfs":
	default:
		return fmt.Errorf("csi: default file system %q: want ext4 or xfs", cfg.DefaultFsType)
	}
	if cfg.ISCSIAdm == "" {
		cfg.ISCSIAdm = attach.DefaultISCSIAdm
	}
	mode, err := resolveAttach(cfg.Attach, kernelnbd.Loaded(), func() error { return attach.ISCSIUnavailable(cfg.ISCSIAdm) })
	if err != nil {
		return err
	}
	if mode == attach.AttachNBD {
		// The module is there; its netlink family must be reachable too.
		c, err := kernelnbd.Open()
		switch {
		case errors.Is(err, kernelnbd.ErrNotLoaded):
			return errors.New("csi: attach nbd: the nbd kernel module is loaded but its netlink family is not reachable from here: the node plugin needs the host's network namespace (hostNetwork: true)")
		case err != nil:
			return fmt.Errorf("csi: attach nbd: %w", err)
		}
		c.Close()
	}
	cfg.Attach = mode
	if cfg.ReattachTimeout <= 0 {
		cfg.ReattachTimeout = attach.DefaultReattachTimeout
	}
	if cfg.Executable == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("csi: find the executable for attach processes: %w", err)
		}
		cfg.Executable = exe
	}
	if err := os.MkdirAll(filepath.Join(cfg.StateDir, "volumes"), 0o700); err != nil {
		return fmt.Errorf("csi: state directory: %w", err)
	}
	// The kernel names a loop device's file by its resolved path.
	real, err := filepath.EvalSymlinks(cfg.StateDir)
	if err != nil {
		return fmt.Errorf("csi: state directory: %w", err)
	}
	cfg.StateDir = real
	d.exe = cfg.Executable
	d.exec = utilexec.New()
	d.mounter = &mount.SafeFormatAndMount{Interface: mount.New(""), Exec: d.exec}
	return nil
}

// Attach modes of Config.Attach.
const (
	AttachFUSE  = attach.AttachFUSE
	AttachNBD   = attach.AttachNBD
	AttachISCSI = attach.AttachISCSI
	// AttachAuto is nbd where the nbd module is loaded, else iscsi where
	// it can run (the iscsi_tcp module, iscsiadm and iscsid), else fuse.
	AttachAuto = "auto"
)

// resolveAttach turns the configured attach mode into the one used, given
// whether the nbd module is loaded and why the iscsi attach cannot run
// (iscsiMissing returns nil when it can).
func resolveAttach(mode string, nbdLoaded bool, iscsiMissing func() error) (string, error) {
	switch mode {
	case "", AttachFUSE:
		return AttachFUSE, nil
	case AttachNBD:
		if !nbdLoaded {
			return "", errors.New("csi: --attach nbd: the nbd kernel module is not loaded: modprobe nbd, or use --attach fuse")
		}
		return AttachNBD, nil
	case AttachISCSI:
		if err := iscsiMissing(); err != nil {
			return "", fmt.Errorf("csi: --attach iscsi: %w", err)
		}
		return AttachISCSI, nil
	case AttachAuto:
		switch {
		case nbdLoaded:
			return AttachNBD, nil
		case iscsiMissing() == nil:
			return AttachISCSI, nil
		}
		return AttachFUSE, nil
	}
	return "", fmt.Errorf("csi: attach mode %q: want %s, %s, %s or %s", mode, AttachFUSE, AttachNBD, AttachISCSI, AttachAuto)
}

// AttachMode is the attach mode the node uses.
func (d *Driver) AttachMode() string { return d.cfg.Attach }

// socketPath turns unix:///path (or a bare path) into the path.
func socketPath(endpoint string) (string, error) {
	p := endpoint
	if rest, ok := strings.CutPrefix(endpoint, "unix://"); ok {
		p = rest
	} else if strings.Contains(endpoint, "://") {
		return "", fmt.Errorf("csi: endpoint %q: only unix:// sockets are served", endpoint)
	}
	if p == "" || !strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("csi: endpoint %q: want an absolute socket path", endpoint)
	}
	return p, nil
}

// Start listens on the endpoint (a stale socket file is replaced) and
// serves in the background.
func (d *Driver) Start() error {
	if err := os.Remove(d.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("csi: remove stale socket %s: %w", d.path, err)
	}
	lis, err := net.Listen("unix", d.path)
	if err != nil {
		return fmt.Errorf("csi: listen on %s: %w", d.path, err)
	}
	d.lis = lis
	d.srv = grpc.NewServer(grpc.UnaryInterceptor(d.logCalls))
	csipb.RegisterIdentityServer(d.srv, identity{d: d})
	var ctx context.Context
	ctx, d.cancel = context.WithCancel(context.Background())
	if d.cfg.Mode != ModeNode {
		csipb.RegisterControllerServer(d.srv, controller{d: d})
		d.flattenKick, d.flattenDone = make(chan struct{}, 1), make(chan struct{})
		go d.runFlattener(ctx)
	}
	if d.cfg.Mode != ModeController {
		csipb.RegisterNodeServer(d.srv, node{d: d})
		d.adopt()
		go d.registerNode(ctx)
		d.watchDone = make(chan struct{})
		go d.watchAttachments(ctx)
	}
	go func() { _ = d.srv.Serve(lis) }()
	d.log.Info("csi driver serving", "endpoint", d.cfg.Endpoint, "mode", d.cfg.Mode, "mds", strings.Join(d.cfg.MDSAddrs, ","),
		"attach", d.cfg.Attach)
	return nil
}

// Stop stops serving and closes the MDS connection. Volumes the node
// staged stay attached: their attach processes run on.
func (d *Driver) Stop() {
	if d.cancel != nil {
		d.cancel()
	}
	if d.srv != nil {
		d.srv.GracefulStop()
	}
	if d.flattenDone != nil {
		<-d.flattenDone // its flatten ends with the context
	}
	if d.watchDone != nil {
		<-d.watchDone // a takeover in progress ends with the context
	}
	_ = d.mds.Close()
	_ = os.Remove(d.path)
}

// logCalls logs every call's method, duration and error code, the way
// operators of CSI drivers read them next to the sidecars' logs.
func (d *Driver) logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := h(ctx, req)
	if err != nil {
		d.log.Info("csi call failed", "method", info.FullMethod, "code", status.Code(err).String(), "err", status.Convert(err).Message(),
			"took", time.Since(start).Round(time.Millisecond))
	} else {
		d.log.Debug("csi call", "method", info.FullMethod, "took", time.Since(start).Round(time.Millisecond))
	}
	return resp, err
}

// lockVolume serialises calls on one volume name.
func (d *Driver) lockVolume(name string) func() {
	m, _ := d.volumeLocks.LoadOrStore(name, &sync.Mutex{})
	mu := m.(*sync.Mutex)
	mu.Lock()
	return mu.Unlock
}

// callCtx bounds one call to the MDS.
func (d *Driver) callCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, d.cfg.CallTimeout)
}

// mdsErr passes an MDS error on with its code (the MDS uses the same
// codes), adding what was being done.
func mdsErr(what string, err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return status.Errorf(codes.Internal, "%s: %v", what, err)
	}
	return status.Errorf(st.Code(), "%s: %s", what, st.Message())
}

// tlsFiles names the identity files attach processes open volumes with.
func (d *Driver) tlsFiles() certs.Files {
	if d.cfg.TLS == nil {
		return certs.Files{}
	}
	return d.cfg.TLS.Files()
}
