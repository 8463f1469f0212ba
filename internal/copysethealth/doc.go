// Package copysethealth judges a copyset's health from the MDS's record of
// it: its members, their online state and what its leader last reported
// (applied index, each follower's replication progress). The MDS's
// cairn_mds_copysets{health} metric and cairn-ops status judge with it, so
// that a dashboard and the command agree on every copyset and every reason.
package copysethealth
