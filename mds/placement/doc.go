// Package placement computes where the copysets of a new logical pool live.
//
// The MDS calls Place once, when a logical pool is created over the chunkservers
// of a physical pool. Every copyset gets its replicas in distinct zones (a zone
// is a failure domain), every chunkserver holds close to the requested number of
// copyset replicas, and every chunkserver's scatter width (the number of distinct
// chunkservers it shares at least one copyset with) is kept close to the others',
// so that recovering a lost chunkserver draws on many peers at once.
//
// The algorithm has two steps.
//
//  1. Targets. With N chunkservers and R replicas per chunkserver the pool gets
//     C = round(N*R/replicas) copysets, that is S = C*replicas replica slots. A
//     zone can hold at most one replica of each copyset, so no zone can take more
//     than C slots. The slots are shared out over the zones in proportion to
//     their number of chunkservers, capping a zone at C and handing its excess to
//     the others (water filling); inside a zone they are shared out evenly over
//     its chunkservers. When no zone holds more than N/replicas of the
//     chunkservers every chunkserver's target is R or R±1.
//  2. Greedy assignment. Copysets are built one at a time. Each takes the
//     replicas zones with the most slots left (ties broken at random); from each
//     of those zones it takes a chunkserver with slots left, preferring ones
//     that share the fewest copysets with the members already chosen (new peers
//     first), then the one with the most slots left. Choosing the fullest zones
//     keeps every zone's remaining slots at most the number of copysets left to
//     build, so the assignment always completes and meets every target exactly.
//
// Place is deterministic for a given random source, which the property tests in
// this package use to check the invariants over many random topologies.
package placement
