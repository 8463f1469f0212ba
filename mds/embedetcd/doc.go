// Package embedetcd runs a single-node etcd inside the MDS process.
//
// It is the MDS's default store: the etcd data lives under the MDS data
// directory and etcd listens on loopback only (ephemeral ports unless told
// otherwise, so that tests running side by side never collide). etcd's own
// logs are discarded; the MDS logs what matters with log/slog. For high
// availability the MDS is pointed at an external etcd cluster instead and this
// package is not used.
package embedetcd
