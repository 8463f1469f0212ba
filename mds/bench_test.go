package mds_test

import (
	"context"
	"fmt"
	"testing"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/mds/mdsclient"
	"cairn.io/cairn/mds/mdstest"
)

// BenchmarkAllocateSegment measures lazy segment allocation (one etcd
// transaction per segment, chunk ids from the batched generator) through the
// gRPC API on an embedded etcd.
func BenchmarkAllocateSegment(b *testing.B) {
	ctx := context.Background()
	cfg := testConfig(b, b.TempDir())
	s := startMDSB(b, cfg)
	conn, err := mdsclient.Dial([]string{s}, mdsclient.Options{Logger: testlog.New(b)})
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	for z := 0; z < 3; z++ {
		for i := 0; i < 2; i++ {
			d := mdstest.StartChunkServerDouble(b, fmt.Sprintf("h%d-%d", z, i), fmt.Sprintf("z%d", z), "pool0")
			if err := d.Register(ctx, conn.Topology(), testConstants); err != nil {
				b.Fatal(err)
			}
		}
	}
	if _, err := conn.Topology().CreateLogicalPool(ctx, &mdspb.CreateLogicalPoolRequest{Name: "lp", PhysicalPool: "pool0", CopysetsPerChunkserver: 50}); err != nil {
		b.Fatal(err)
	}
	if _, err := conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: "v", Size: uint64(b.N+1) * seg}); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: "v", Offset: uint64(i) * seg, Allocate: true}); err != nil {
			b.Fatal(err)
		}
	}
}
