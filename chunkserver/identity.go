package chunkserver

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

const identityFile = "identity.json"

// identity is what the MDS gave this chunkserver at its first registration,
// kept durably so that every restart registers as the same chunkserver.
type identity struct {
	ChunkServerID uint64 `json:"chunkserver_id"`
	Token         string `json:"token"`
	Hostname      string `json:"hostname"`
	Zone          string `json:"zone"`
	PhysicalPool  string `json:"physical_pool"`
}

func loadIdentity(dir string) (*identity, error) {
	b, err := os.ReadFile(filepath.Join(dir, identityFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read identity: %w", err)
	}
	id := &identity{}
	if err := json.Unmarshal(b, id); err != nil {
		return nil, fmt.Errorf("identity file %s is damaged: %w", filepath.Join(dir, identityFile), err)
	}
	return id, nil
}

func saveIdentity(dir string, id *identity) error {
	b, err := json.MarshalIndent(id, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(dir, identityFile), b, 0o600); err != nil {
		return fmt.Errorf("save identity: %w", err)
	}
	return nil
}
