# Cairn build, test and verification targets. Run `make help` for a list.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
GO ?= go
BIN := bin
TOOLS := $(BIN)/tools
PROTOS := $(shell find api -name '*.proto' | sort)
# The go.etcd.io/raft/v3 module, whose raftpb/raft.proto api/ imports.
RAFT_PROTO = $(shell $(GO) list -m -f '{{.Dir}}' go.etcd.io/raft/v3)
# Packages make test runs (all of them, under the race detector).
RACE_PKGS ?= ./...
TEST_TIMEOUT ?= 25m

.PHONY: help build deps test test-short verify proto proto-check tools lint imports clean

help: ## list the targets
	@grep -E '^[a-z][a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

build: ## build every binary into bin/
	@mkdir -p $(BIN)
	$(GO) build -buildvcs=auto -o $(BIN)/ ./cmd/...

deps: ## install (as root) or name the Debian packages the tests use (.ci/packages)
	@bash .ci/deps

test: deps ## run the whole test suite with the race detector
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(RACE_PKGS)

test-short: ## run the unit tests only (skips multi-process suites)
	$(GO) test -short -count=1 ./...

$(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc $(TOOLS)/staticcheck $(TOOLS)/goimports: go.mod go.sum
	@mkdir -p $(TOOLS)
	$(GO) build -o $(TOOLS)/ google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc honnef.co/go/tools/cmd/staticcheck golang.org/x/tools/cmd/goimports

tools: $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc $(TOOLS)/staticcheck $(TOOLS)/goimports ## build the pinned code generators and linters

proto: tools ## regenerate the Go code of api/*.proto
	@command -v protoc >/dev/null || { echo "make proto: protoc not found; install it with: apt-get install protobuf-compiler" >&2; exit 1; }
	@test -f "$(RAFT_PROTO)/raftpb/raft.proto" || { echo "make proto: raftpb/raft.proto not found in the go.etcd.io/raft/v3 module (go mod download)" >&2; exit 1; }
	protoc -I api -I $(RAFT_PROTO)/raftpb \
	  --plugin=protoc-gen-go=$(TOOLS)/protoc-gen-go --go_out=api --go_opt=paths=source_relative \
	  --plugin=protoc-gen-go-grpc=$(TOOLS)/protoc-gen-go-grpc --go-grpc_out=api --go-grpc_opt=paths=source_relative \
	  $(patsubst api/%,%,$(PROTOS))

proto-check: proto ## fail when the committed generated code is stale
	@git diff --exit-code --stat -- api || { echo "generated code in api/ is stale: run make proto and commit" >&2; exit 1; }

lint: tools ## run the pinned static checker
	$(TOOLS)/staticcheck ./...

imports: tools ## fix import grouping (standard library, third party, cairn.io) in place
	$(TOOLS)/goimports -local cairn.io -w $$(git ls-files '*.go' | grep -v '\.pb\.go$$')

verify: proto-check lint ## gofmt, import grouping, go vet, staticcheck, go mod tidy and fresh generated code
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	@out=$$($(TOOLS)/goimports -local cairn.io -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); if [ -n "$$out" ]; then echo "imports need grouping (make imports):"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod/go.sum are not tidy: run go mod tidy and commit" >&2; exit 1; }

clean: ## remove build output
	rm -rf $(BIN)

.PHONY: bench-chunkfilepool
BENCH_CFP_FLAGS ?= -size 512MiB -duration 30s -rounds 6
bench-chunkfilepool: ## synced 4 KiB random writes into a pool chunk vs a fallocated and a sparse file (~1.5 GiB of disk, removed after)
	$(GO) run ./bench/chunkfilepool $(BENCH_CFP_FLAGS)

.PHONY: iscsi-conformance
iscsi-conformance: ## run libiscsi's iscsi-test-cu against Cairn's iSCSI target and Debian's tgt side by side; writes docs/generated/iscsi-conformance.md and fails on a regression
	CAIRN_ISCSI_CONFORMANCE=1 CAIRN_ISCSI_CONFORMANCE_TGT=1 $(GO) test -count=1 -v -timeout 20m -run 'TestConformance$$' ./iscsi/

.PHONY: bench-copyset
BENCH_COPYSET_FLAGS ?= -copysets 1,10,100 -duration 10s
bench-copyset: ## committed 4 KiB writes/s and entries per fdatasync: shared group-commit WAL vs one WAL per copyset (~1.5 GiB of disk, removed after)
	$(GO) run ./bench/copyset $(BENCH_COPYSET_FLAGS)

.PHONY: playground
PLAYGROUND_FLAGS ?=
playground: build ## start a local cluster (MDS, three chunkservers in three zones, NBD/iSCSI gateway) with volume vol0; data in .playground, Ctrl-C stops it
	$(BIN)/cairn-playground --bin-dir $(BIN) $(PLAYGROUND_FLAGS)

.PHONY: bench-snapshot
bench-snapshot: build ## 4 KiB random writes right after a snapshot (copy on write) vs later, QD1 and QD32; clone creation, first writes into a clone, flatten throughput; against a temporary playground (~3 GiB of disk, removed after)
	bench/snapshot/run.sh $(BIN)

.PHONY: bench bench-iscsi
BENCH_FLAGS ?= -fill 1GiB -runtime 30s
bench: build ## fio --ioengine=nbd against a temporary playground's vol0: 4 KiB random QD1/QD32, 1 MiB sequential (~4 GiB of disk, removed after)
	$(GO) run ./bench/gateway -bin $(BIN) -nbd -iscsi=false $(BENCH_FLAGS)

bench-iscsi: build ## qemu-img bench and iscsi-perf against a temporary playground's vol0 over iSCSI (~4 GiB of disk, removed after)
	$(GO) run ./bench/gateway -bin $(BIN) -nbd=false -iscsi $(BENCH_FLAGS)

.PHONY: nemesis
CYCLES ?= 1000
SEED ?= $(shell date +%s)
NEMESIS_FLAGS ?=
nemesis: ## long fault-injection run over a multi-process cluster in network namespaces, as root (CYCLES=1000 SEED=<time> NEMESIS_FLAGS='-faults kill-chunkserver,... -keep DIR'); see docs/reliability.md
	$(GO) test -count=1 -v -timeout 0 -run '^TestNemesis$$' ./test/nemesis -args -cycles $(CYCLES) -seed $(SEED) $(NEMESIS_FLAGS)
