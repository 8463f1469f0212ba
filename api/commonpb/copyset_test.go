package commonpb

import "testing"

func TestCopysetIdentity(t *testing.T) {
	r := &CopysetRef{LogicalPoolId: 3, CopysetId: 7}
	if r.Key() != 3<<32|7 || CopysetKey(3, 7) != r.Key() {
		t.Fatalf("key %x", r.Key())
	}
	if r.Name() != "3:7" {
		t.Fatalf("name %q", r.Name())
	}
	var none *CopysetRef
	if none.Key() != 0 || none.Name() != "0:0" {
		t.Fatal("a nil ref")
	}
}
