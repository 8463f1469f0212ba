// Package mds is Cairn's metadata server: the single source of truth for
// where data lives.
//
// An MDS keeps its state in etcd (an embedded single-node etcd under its data
// directory by default, an external cluster for high availability) and
// serves four gRPC services (api/mdspb):
//
//   - TopologyService: chunkserver registration (zone, server and physical
//     pool are created on first use), listings, and logical pool creation,
//     which places copysets (package placement) and asks every member
//     chunkserver to create them.
//   - HeartbeatService: chunkservers report capacity and copyset state; the
//     MDS derives ONLINE / UNSTABLE / OFFLINE from heartbeat age, keeps each
//     copyset's leader, members and conf epoch (the leader's report and the
//     newest epoch win), and answers with operators and, when a chunkserver's
//     copy is behind, the table of volume epochs.
//   - VolumeService: the volume namespace, sessions with leases, lazy
//     segment allocation (a segment's chunk ids come from a batched id
//     generator and its chunks go round-robin over the pool's healthy
//     copysets) and epoch fencing: a writable open bumps the volume's epoch,
//     pushes it to every chunkserver of the volume's pool and, if one did not
//     acknowledge, waits until it lost its epoch lease (which every heartbeat
//     answer grants for Config.EpochLease from the heartbeat's send time) or
//     reported the new table, before returning (fence.go).
//   - ClusterService: cluster status and the transfer-leader operator.
//
// Several MDS processes can share one etcd: they campaign in an etcd
// election, only the leader serves, and every call to a follower fails with
// UNAVAILABLE and a mdspb.NotLeader detail naming the leader (package
// mdsclient follows it). Every write the leader makes is an etcd transaction
// guarded by its election key, so a deposed leader cannot change anything.
// Work in progress (pool creation, freeing the chunks of deleted volumes,
// session expiry) is recorded in etcd and resumes on the next leader.
//
// The package is embeddable: New(Config), Start, Addr and Stop run an MDS
// inside a test or another program; cmd/cairn-mds is a thin main around it.
// docs/mds.md describes the etcd key layout and the flows in detail.
package mds
