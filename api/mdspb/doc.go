// Package mdspb holds the generated Go code of the MDS API (api/mdspb/mds.proto): topology and
// registration, heartbeats, the volume namespace, segment allocation and cluster views.
//
// Edit the .proto file and run `make proto`; never edit the .pb.go files by hand.
package mdspb
