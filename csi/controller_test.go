package csi_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/csi"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/test/cluster"
)

const (
	mib = 1 << 20
	seg = 64 * mib // the test cluster's segment size
)

// env is a test cluster with the driver serving on a unix socket.
type env struct {
	c    *cluster.Cluster
	ctl  csipb.ControllerClient
	id   csipb.IdentityClient
	ctx  context.Context
	caps []*csipb.VolumeCapability
}

func start(t *testing.T) *env {
	t.Helper()
	return startWith(t, cluster.Options{})
}

// startWith is start on a cluster started with opts.
func startWith(t *testing.T, opts cluster.Options) *env {
	t.Helper()
	c := cluster.Start(t, opts)
	sock := filepath.Join(t.TempDir(), "csi.sock")
	d, err := csi.New(csi.Config{Endpoint: "unix://" + sock, MDSAddrs: []string{c.MDS.Addr()}, Version: "test", Logger: testlog.New(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return &env{
		c: c, ctl: csipb.NewControllerClient(conn), id: csipb.NewIdentityClient(conn), ctx: ctx,
		caps: []*csipb.VolumeCapability{mountCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "ext4")},
	}
}

func mountCap(mode csipb.VolumeCapability_AccessMode_Mode, fs string) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: fs}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: mode},
	}
}

func blockCap(mode csipb.VolumeCapability_AccessMode_Mode) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: mode},
	}
}

func wantCode(t *testing.T, what string, err error, code codes.Code, msg string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), msg) {
		t.Errorf("%s: %v; want %s with %q", what, err, code, msg)
	}
}

// volumeNames lists the cluster's volumes at the MDS (not those being
// deleted).
func (e *env) volumeNames(t *testing.T) []string {
	t.Helper()
	resp, err := e.c.Conn.Volumes().ListVolumes(e.ctx, &mdspb.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, v := range resp.Volumes {
		if v.Status == mdspb.VolumeStatus_VOLUME_STATUS_CREATED {
			out = append(out, v.Name)
		}
	}
	return out
}

func TestIdentity(t *testing.T) {
	e := start(t)
	info, err := e.id.GetPluginInfo(e.ctx, &csipb.GetPluginInfoRequest{})
	if err != nil || info.Name != "csi.cairn.io" || info.VendorVersion != "test" {
		t.Fatalf("plugin info %v, %v", info, err)
	}
	probe, err := e.id.Probe(e.ctx, &csipb.ProbeRequest{})
	if err != nil || !probe.GetReady().GetValue() {
		t.Fatalf("probe %v, %v", probe, err)
	}
	caps, err := e.ctl.ControllerGetCapabilities(e.ctx, &csipb.ControllerGetCapabilitiesRequest{})
	if err != nil || len(caps.Capabilities) != 9 {
		t.Fatalf("controller capabilities %v, %v", caps, err)
	}
	// Node mode needs a node id and an absolute state directory.
	for _, cfg := range []csi.Config{
		{Endpoint: "unix:///tmp/x.sock", MDSAddrs: []string{"127.0.0.1:1"}, Mode: csi.ModeNode, StateDir: t.TempDir()},
		{Endpoint: "unix:///tmp/x.sock", MDSAddrs: []string{"127.0.0.1:1"}, Mode: csi.ModeNode, NodeID: "n1", StateDir: "relative"},
		{Endpoint: "unix:///tmp/x.sock", MDSAddrs: []string{"127.0.0.1:1"}, Mode: "nodes", NodeID: "n1", StateDir: t.TempDir()},
	} {
		if _, err := csi.New(cfg); err == nil {
			t.Fatalf("%+v accepted", cfg)
		}
	}
}

func TestCreateVolume(t *testing.T) {
	e := start(t)
	create := func(name string, req, lim int64, caps []*csipb.VolumeCapability, params map[string]string) (*csipb.CreateVolumeResponse, error) {
		return e.ctl.CreateVolume(e.ctx, &csipb.CreateVolumeRequest{
			Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: req, LimitBytes: lim},
			VolumeCapabilities: caps, Parameters: params,
		})
	}
	resp, err := create("pvc-1", 10*mib, 0, e.caps, map[string]string{"pool": "pool", "csi.storage.k8s.io/pvc/name": "data"})
	if err != nil {
		t.Fatal(err)
	}
	if v := resp.Volume; v.VolumeId != "pvc-1" || v.CapacityBytes != seg || v.VolumeContext["pool"] != "pool" {
		t.Fatalf("created %v; want pvc-1 of one segment in pool", v)
	}
	// The same request again: the same volume.
	again, err := create("pvc-1", 10*mib, 0, e.caps, nil)
	if err != nil || again.Volume.CapacityBytes != seg {
		t.Fatalf("create again: %v, %v", again, err)
	}
	before := e.volumeNames(t)
	for _, tc := range []struct {
		what     string
		name     string
		req, lim int64
		caps     []*csipb.VolumeCapability
		params   map[string]string
		code     codes.Code
		msg      string
	}{
		{"the name taken with a larger size", "pvc-1", 200 * mib, 0, e.caps, nil, codes.AlreadyExists, "less than the 209715200 required"},
		{"no name", "", mib, 0, e.caps, nil, codes.InvalidArgument, "name is required"},
		{"no capabilities", "pvc-2", mib, 0, nil, nil, codes.InvalidArgument, "capabilities are required"},
		{"several writers", "pvc-2", mib, 0, []*csipb.VolumeCapability{mountCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER, "")}, nil, codes.InvalidArgument, "one writer"},
		{"another file system", "pvc-2", mib, 0, []*csipb.VolumeCapability{mountCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "btrfs")}, nil, codes.InvalidArgument, `file system "btrfs"`},
		{"unknown parameter", "pvc-2", mib, 0, e.caps, map[string]string{"replicas": "2"}, codes.InvalidArgument, `unknown parameter "replicas"`},
		{"unknown pool", "pvc-2", mib, 0, e.caps, map[string]string{"pool": "nope"}, codes.NotFound, "nope"},
		{"required over limit", "pvc-2", 10 * mib, 5 * mib, e.caps, nil, codes.InvalidArgument, "exceed the limit"},
		{"a limit under one segment", "pvc-2", mib, 2 * mib, e.caps, nil, codes.OutOfRange, "over the limit"},
	} {
		_, err := create(tc.name, tc.req, tc.lim, tc.caps, tc.params)
		wantCode(t, tc.what, err, tc.code, tc.msg)
	}
	if after := e.volumeNames(t); len(after) != len(before) {
		t.Fatalf("refused creates changed the volumes: %v -> %v", before, after)
	}
	// No range: the default size; a block volume.
	resp, err = create("pvc-3", 0, 0, []*csipb.VolumeCapability{blockCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)}, nil)
	if err != nil || resp.Volume.CapacityBytes != 1<<30 {
		t.Fatalf("default size: %v, %v", resp, err)
	}
}

func TestDeleteVolume(t *testing.T) {
	e := start(t)
	if _, err := e.ctl.DeleteVolume(e.ctx, &csipb.DeleteVolumeRequest{VolumeId: "never"}); err != nil {
		t.Fatalf("delete of an unknown volume: %v", err)
	}
	wantCode(t, "delete without id", func() error {
		_, err := e.ctl.DeleteVolume(e.ctx, &csipb.DeleteVolumeRequest{})
		return err
	}(), codes.InvalidArgument, "volume id is required")
	if _, err := e.ctl.CreateVolume(e.ctx, &csipb.CreateVolumeRequest{Name: "pvc-d", VolumeCapabilities: e.caps, CapacityRange: &csipb.CapacityRange{RequiredBytes: mib}}); err != nil {
		t.Fatal(err)
	}
	open, err := e.c.Conn.Volumes().OpenVolume(e.ctx, &mdspb.OpenVolumeRequest{Name: "pvc-d", Writable: true, Client: "node-a"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.ctl.DeleteVolume(e.ctx, &csipb.DeleteVolumeRequest{VolumeId: "pvc-d"})
	wantCode(t, "delete while open for writing", err, codes.FailedPrecondition, `open for writing by "node-a"`)
	if _, err := e.c.Conn.Volumes().CloseVolume(e.ctx, &mdspb.CloseVolumeRequest{Name: "pvc-d", SessionId: open.Session.SessionId}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := e.ctl.DeleteVolume(e.ctx, &csipb.DeleteVolumeRequest{VolumeId: "pvc-d"}); err != nil {
			t.Fatalf("delete: %v", err)
		}
	}
	for _, n := range e.volumeNames(t) {
		if n == "pvc-d" {
			t.Fatal("volume still listed after delete")
		}
	}
}

func TestExpandVolume(t *testing.T) {
	e := start(t)
	if _, err := e.ctl.CreateVolume(e.ctx, &csipb.CreateVolumeRequest{Name: "pvc-x", VolumeCapabilities: e.caps, CapacityRange: &csipb.CapacityRange{RequiredBytes: mib}}); err != nil {
		t.Fatal(err)
	}
	resp, err := e.ctl.ControllerExpandVolume(e.ctx, &csipb.ControllerExpandVolumeRequest{
		VolumeId: "pvc-x", CapacityRange: &csipb.CapacityRange{RequiredBytes: 100 * mib}, VolumeCapability: e.caps[0],
	})
	if err != nil || resp.CapacityBytes != 2*seg || !resp.NodeExpansionRequired {
		t.Fatalf("expand: %v, %v; want 2 segments and a file system to grow", resp, err)
	}
	// Again, and smaller: nothing changes.
	resp, err = e.ctl.ControllerExpandVolume(e.ctx, &csipb.ControllerExpandVolumeRequest{
		VolumeId: "pvc-x", CapacityRange: &csipb.CapacityRange{RequiredBytes: 10 * mib},
		VolumeCapability: blockCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER),
	})
	if err != nil || resp.CapacityBytes != 2*seg || resp.NodeExpansionRequired {
		t.Fatalf("expand a block volume to less: %v, %v", resp, err)
	}
	_, err = e.ctl.ControllerExpandVolume(e.ctx, &csipb.ControllerExpandVolumeRequest{VolumeId: "nope", CapacityRange: &csipb.CapacityRange{RequiredBytes: mib}})
	wantCode(t, "expand an unknown volume", err, codes.NotFound, "nope")
	_, err = e.ctl.ControllerExpandVolume(e.ctx, &csipb.ControllerExpandVolumeRequest{VolumeId: "pvc-x"})
	wantCode(t, "expand without a range", err, codes.InvalidArgument, "capacity range is required")
}

func TestListValidateAndCapacity(t *testing.T) {
	e := start(t)
	for _, n := range []string{"pvc-c", "pvc-a", "pvc-e", "pvc-b", "pvc-d"} {
		if _, err := e.ctl.CreateVolume(e.ctx, &csipb.CreateVolumeRequest{Name: n, VolumeCapabilities: e.caps, CapacityRange: &csipb.CapacityRange{RequiredBytes: mib}}); err != nil {
			t.Fatal(err)
		}
	}
	var names []string
	token := ""
	for pages := 0; ; pages++ {
		resp, err := e.ctl.ListVolumes(e.ctx, &csipb.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, en := range resp.Entries {
			names = append(names, en.Volume.VolumeId)
		}
		if token = resp.NextToken; token == "" {
			if pages != 2 {
				t.Fatalf("%d pages of 2 for 5 volumes", pages+1)
			}
			break
		}
	}
	if strings.Join(names, ",") != "pvc-a,pvc-b,pvc-c,pvc-d,pvc-e" {
		t.Fatalf("listed %v", names)
	}
	_, err := e.ctl.ListVolumes(e.ctx, &csipb.ListVolumesRequest{StartingToken: "bogus"})
	wantCode(t, "a token not given", err, codes.Aborted, "bogus")

	ok, err := e.ctl.ValidateVolumeCapabilities(e.ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: "pvc-a", VolumeCapabilities: e.caps})
	if err != nil || ok.Confirmed == nil {
		t.Fatalf("validate a supported capability: %v, %v", ok, err)
	}
	no, err := e.ctl.ValidateVolumeCapabilities(e.ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: "pvc-a",
		VolumeCapabilities: []*csipb.VolumeCapability{blockCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}})
	if err != nil || no.Confirmed != nil || !strings.Contains(no.Message, "one writer") {
		t.Fatalf("validate an unsupported capability: %v, %v", no, err)
	}
	_, err = e.ctl.ValidateVolumeCapabilities(e.ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: "nope", VolumeCapabilities: e.caps})
	wantCode(t, "validate an unknown volume", err, codes.NotFound, "nope")

	capResp, err := e.ctl.GetCapacity(e.ctx, &csipb.GetCapacityRequest{Parameters: map[string]string{"pool": "pool"}})
	if err != nil || capResp.AvailableCapacity <= 0 {
		t.Fatalf("capacity: %v, %v", capResp, err)
	}
	_, err = e.ctl.GetCapacity(e.ctx, &csipb.GetCapacityRequest{Parameters: map[string]string{"pool": "nope"}})
	wantCode(t, "capacity of an unknown pool", err, codes.InvalidArgument, `"nope" does not exist`)
}
