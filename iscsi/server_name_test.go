package iscsi

import "testing"

// TestTargetNames: a snapshot's target name carries no "@" (initiators'
// URLs read it as the end of a user name) and maps back to the snapshot.
func TestTargetNames(t *testing.T) {
	s := &Server{cfg: Config{IQNPrefix: DefaultIQNPrefix}}
	for dev, iqn := range map[string]string{
		"vol0":       DefaultIQNPrefix + ":vol0",
		"vol0@snap1": DefaultIQNPrefix + ":vol0:snap:snap1",
		"a@b@c":      DefaultIQNPrefix + ":a@b:snap:c",
	} {
		if got := s.TargetName(dev); got != iqn {
			t.Errorf("TargetName(%q) = %q, want %q", dev, got, iqn)
		}
		if got, ok := s.volumeOf(iqn); !ok || got != dev {
			t.Errorf("volumeOf(%q) = %q %v, want %q", iqn, got, ok, dev)
		}
	}
}
