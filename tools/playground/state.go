package playground

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// StateFile is the name of the state file in the playground's directory.
const StateFile = "playground.json"

// State describes a running playground; it is written to <dir>/playground.json
// whenever it changes (a child started or restarted, readiness) and removed
// when the playground stops cleanly. Tests and tools read it with ReadState.
type State struct {
	// PID is the cairn-playground process.
	PID int `json:"pid"`
	// Dir is the playground's directory (absolute).
	Dir string `json:"dir"`
	// Ready is true once the cluster, the volume and the gateway serve.
	Ready     bool      `json:"ready"`
	StartedAt time.Time `json:"started_at"`
	// MDS is the MDS gRPC address (what CAIRN_MDS takes).
	MDS string `json:"mds"`
	// NBD and ISCSI are the gateway's listen addresses.
	NBD   string `json:"nbd"`
	ISCSI string `json:"iscsi"`
	// Volume is the volume the playground creates.
	Volume VolumeState `json:"volume"`
	// TLS names the CA and the operator's certificate (absent when the
	// playground runs without TLS).
	TLS *TLSState `json:"tls,omitempty"`
	// Processes are the children: mds, cs0..cs2, gateway.
	Processes []ProcessState `json:"processes"`
}

// VolumeState names the playground's volume and its URLs.
type VolumeState struct {
	Name     string `json:"name"`
	Size     uint64 `json:"size"`
	NBDURL   string `json:"nbd_url"`
	ISCSIURL string `json:"iscsi_url"`
}

// ProcessState is one child process.
type ProcessState struct {
	// Name is mds, cs0, cs1, cs2 or gateway.
	Name string `json:"name"`
	// PID is the running process (0 while it is down).
	PID int `json:"pid"`
	// Addr is the gRPC address (MDS, chunkserver) or empty.
	Addr string `json:"addr,omitempty"`
	// MetricsAddr serves /metrics and /healthz.
	MetricsAddr string `json:"metrics_addr"`
	// DataDir is the data directory (MDS, chunkserver) or empty.
	DataDir string `json:"data_dir,omitempty"`
	// Zone is a chunkserver's zone.
	Zone string `json:"zone,omitempty"`
	// Log is the file its stdout and stderr go to.
	Log string `json:"log"`
	// Restarts counts unexpected exits the playground restarted it after.
	Restarts  int       `json:"restarts"`
	StartedAt time.Time `json:"started_at"`
}

// Process returns the state of the named child, or nil.
func (s *State) Process(name string) *ProcessState {
	for i := range s.Processes {
		if s.Processes[i].Name == name {
			return &s.Processes[i]
		}
	}
	return nil
}

// ErrNotRunning is returned by ReadState when a directory has no state
// file: no playground runs there (or it stopped cleanly).
var ErrNotRunning = errors.New("no playground running")

// ReadState reads the state file of the playground in dir.
func ReadState(dir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w in %s", ErrNotRunning, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("read playground state: %w", err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("parse %s: %w", filepath.Join(dir, StateFile), err)
	}
	return &s, nil
}
