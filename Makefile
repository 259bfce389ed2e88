# Meridian build, test and tooling. Every tool is installed from the Go module
# proxy at a pinned version into .tools/bin; nothing is taken from PATH except
# go itself.

SHELL := /bin/bash
GO    ?= go
GOFMT ?= $(shell $(GO) env GOROOT)/bin/gofmt

TOOLS_DIR := $(CURDIR)/.tools
TOOLS_BIN := $(TOOLS_DIR)/bin

# Pinned tool versions. Change them here only.
STATICCHECK_VERSION        := v0.8.2
BUF_VERSION                := v1.75.0
PROTOC_GEN_GO_VERSION      := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2

STATICCHECK        := $(TOOLS_BIN)/staticcheck-$(STATICCHECK_VERSION)
BUF                := $(TOOLS_BIN)/buf-$(BUF_VERSION)
PROTOC_GEN_GO      := $(TOOLS_BIN)/protoc-gen-go-$(PROTOC_GEN_GO_VERSION)
PROTOC_GEN_GO_GRPC := $(TOOLS_BIN)/protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION)

# buf.gen.yaml names the protoc plugins by these unversioned paths; `make proto`
# points them at the pinned binaries above, so versions live in this file only.
PROTOC_PLUGINS := $(TOOLS_DIR)/protoc-plugins

.PHONY: all build demo demo-check test test-terraform test-long test-clock test-hang-check bench-fs bench-trace bench-repl bench-failover bench-handoff bench-router bench-regions lint proto proto-check fuzz bench tools clean

all: build

# demo runs three regions on this machine (examples/demo): Consul, three
# regiond nodes with the guestbook behind their routers, mutual TLS, and
# WAN latency between the regions; Ctrl-C stops it. State in DEMO_DIR
# (default /tmp/meridian-demo), wiped at each start unless DEMO_KEEP=1.
demo: build
	MERIDIAN_CONSUL=$$(scripts/install-consul.sh) && export MERIDIAN_CONSUL && \
		MERIDIAN_JAEGER=$$(scripts/install-jaeger.sh) && export MERIDIAN_JAEGER && \
		$(GO) run ./examples/demo -regiond bin/regiond -app bin/guestbook

# demo-check takes the demo's scripted tour unattended (a write through the
# farthest region, the primary killed, a write through every region) and
# checks its output and that nothing of it is left (build tag democheck).
demo-check: build
	MERIDIAN_CONSUL=$$(scripts/install-consul.sh) && export MERIDIAN_CONSUL && \
		MERIDIAN_JAEGER=$$(scripts/install-jaeger.sh) && export MERIDIAN_JAEGER && \
		scripts/bounded-run 10m $(GO) test -tags democheck -count=1 -timeout 8m -v ./examples/demo

build:
	$(GO) build ./...
	$(GO) build -o bin/regiond ./cmd/regiond
	$(GO) build -o bin/guestbook ./examples/guestbook

# Test runs have two bounds: each test binary's own -timeout, and the whole
# run's, which scripts/bounded-run enforces whatever the tests do: past it,
# it prints the stacks of the running tests, aborts the FUSE connections of
# the run's mounts, kills the run's processes and fails. Either way nothing
# of the run is left: no mount, no process (see DESIGN.md, "Testing FUSE
# safely").
TEST_TIMEOUT ?= 13m
TEST_BOUND   ?= 870s

# The lease tests run a real Consul agent: scripts/install-consul.sh builds
# it from the module proxy the first time (about five minutes on two cores)
# and prints the cached binary's path from then on.
test:
	MERIDIAN_CONSUL=$$(scripts/install-consul.sh) && export MERIDIAN_CONSUL && \
		scripts/bounded-run $(TEST_BOUND) $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...

# test-long runs the tests behind the `long` build tag: databases grown past
# 1 GiB (SQLite's lock page) through the FUSE mount and rebuilt from their
# logs, and 10,000 read-your-writes sequences through the routers of three
# regions. About 3 minutes; CI runs it.
test-long:
	scripts/bounded-run 35m $(GO) test -tags long -count=1 -timeout 30m -run '^TestLong' ./...

# test-clock jumps the machine's wall clock 2 h ahead and 3 min behind
# under a primary on the Consul lease (build tag clockjump), and puts it
# right after, also on SIGTERM and SIGINT, not on SIGKILL. It sets the
# clock of the whole machine: run it on a machine of its own, with nothing
# else running; CI does not run it.
test-clock:
	MERIDIAN_CONSUL=$$(scripts/install-consul.sh) && export MERIDIAN_CONSUL && \
		$(GO) test -tags clockjump -count=1 -timeout 5m -run '^TestClockJump$$' -v ./cmd/regiond

# test-hang-check proves the bounds: a test wedged in a FUSE request on its
# own mount (fs/hang_test.go, build tag hangcheck) must fail within its
# bound and leave no mount and no process, whether its -timeout, the bound
# or a SIGKILL ends it. About a minute; CI runs it.
test-hang-check:
	scripts/hang-check

# test-terraform checks the Terraform modules (terraform/, see the README):
# terraform fmt -check and validate of every module and the example,
# terraform test on the topology module, every regiond.yml it renders
# loaded in regiond, and terraform/examples/local taken through apply, a
# write read in every region, a rolling change of durability under writes
# and destroy, and the systemd unit the hosts module installs checked with
# systemd-analyze verify (build tag terraform; needs root, openssh-server
# and systemd's tools).
# Terraform from PATH, else OpenTofu built by scripts/install-terraform.sh;
# CI runs it.
test-terraform: build
	MERIDIAN_TERRAFORM=$$(scripts/install-terraform.sh) && export MERIDIAN_TERRAFORM && \
		MERIDIAN_CONSUL=$$(scripts/install-consul.sh) && export MERIDIAN_CONSUL && \
		export TF_CLI_CONFIG_FILE=$(CURDIR)/terraform/cli.tfrc TF_IN_AUTOMATION=1 CHECKPOINT_DISABLE=1 && \
		"$$MERIDIAN_TERRAFORM" fmt -check -recursive terraform && \
		for d in terraform/modules/topology terraform/modules/hosts terraform/examples/local; do \
			"$$MERIDIAN_TERRAFORM" -chdir=$$d init -backend=false -input=false -no-color >/dev/null && \
			"$$MERIDIAN_TERRAFORM" -chdir=$$d validate -no-color || exit 1; \
		done && \
		"$$MERIDIAN_TERRAFORM" -chdir=terraform/modules/topology test -no-color && \
		scripts/bounded-run 15m $(GO) test -tags terraform -count=1 -timeout 12m -v -run '^TestTerraform' ./regiond

# fuzz runs every FuzzX target of ltx/, fs/, replication/, regiond/,
# lease/ and router/, one at a time,
# for FUZZTIME each (make fuzz FUZZTIME=5m). An input that fails is saved
# under the package's testdata/fuzz/FuzzX/ and stops the run; commit it with
# the fix, as plain `go test` runs it from then on.
FUZZTIME ?= 30s

fuzz:
	@set -e; for pkg in ./ltx ./fs ./replication ./regiond ./lease ./router; do \
		list=$$($(GO) test -list '^Fuzz' $$pkg); \
		targets=$$(echo "$$list" | grep '^Fuzz' || true); \
		[ -n "$$targets" ] || { echo "fuzz: no FuzzX targets in $$pkg"; exit 1; }; \
		for target in $$targets; do \
			echo "fuzz: $$pkg $$target for $(FUZZTIME)"; \
			$(GO) test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) $$pkg; \
		done; \
	done

# bench runs the benchmarks that print figures: the LTX log's whole-database
# operations against the plain operation on the same bytes.
BENCH_SIZE ?= 256

bench:
	$(GO) run ./bench/ltxbench -size $(BENCH_SIZE)

# bench-fs runs the same SQLite workloads on a bare directory and through
# regiond's FUSE mount (needs root and fuse3); see bench/README.md.
FSBENCH_FLAGS ?=

bench-fs: build
	$(GO) run ./bench/fsbench -regiond bin/regiond $(FSBENCH_FLAGS)

# bench-trace measures what tracing every commit costs: the same regiond
# binary with every commit traced and its spans exported over OTLP/gRPC to
# a collector in the benchmark, against tracing off, in WAL+NORMAL and
# DELETE+FULL; see bench/README.md.
bench-trace: build
	$(GO) run ./bench/fsbench -regiond bin/regiond -trace -baseline bin/regiond -baseline-label "tracing off" \
		-modes wal-normal,delete-full -workloads insert-1 -passthrough=false $(FSBENCH_FLAGS)

# bench-repl measures replication across real regiond processes on loopback
# (needs root and fuse3): lag at paced and maximum commit rates with one and
# three replicas, apply against commit throughput, and a joining node's
# snapshot against copying the file; see bench/README.md.
REPLBENCH_FLAGS ?=

bench-repl: build
	$(GO) run ./bench/replbench -regiond bin/regiond $(REPLBENCH_FLAGS)

# bench-failover kills the primary of three regiond nodes on the Consul
# lease, trial after trial, and times the first write acknowledged on
# another node (needs root and fuse3; builds the Consul agent like
# `make test`). FAILOVER_FLAGS passes flags, e.g. '-trials 5'.
bench-failover: build
	MERIDIAN_CONSUL=$$(scripts/install-consul.sh) && export MERIDIAN_CONSUL && \
		$(GO) run ./bench/failover -regiond bin/regiond $(FAILOVER_FLAGS)

# bench-handoff hands the primary of three regiond nodes on the Consul lease
# from node to node while clients write, and times how long writes stop,
# on loopback and with WAN latency between the nodes (toxiproxy); see
# bench/README.md. HANDOFF_FLAGS='-latency 0,40ms -durability sync'.
bench-handoff: build
	MERIDIAN_CONSUL=$$(scripts/install-consul.sh) && export MERIDIAN_CONSUL && \
		$(GO) run ./bench/handoff -regiond bin/regiond $(HANDOFF_FLAGS)

# bench-router measures the router against straight to the app: reads,
# local and forwarded writes and read-your-writes waits, through three
# regiond nodes running bin/guestbook, on loopback and with WAN latency
# between them (toxiproxy); see bench/README.md. ROUTERBENCH_FLAGS='-n 1000'.
bench-router: build
	$(GO) run ./bench/routerbench -regiond bin/regiond -app bin/guestbook $(ROUTERBENCH_FLAGS)

# bench-regions is the cross-region benchmark (bench/regions): iad, fra
# and syd on this machine with WAN round trips between them (toxiproxy), a
# mixed read/write workload from clients in every region against Meridian
# and against one central database, each followed by open-loop throughput
# steps, in one run, then ten kills of the primary on the Consul lease; it
# writes bench/results/<date>-<host>.md and its PNG plots (needs root and
# fuse3; about seven minutes).
# REGIONS_FLAGS passes flags, e.g. '-regions iad,fra,syd,sin,gru -duration 2m'.
bench-regions: build
	MERIDIAN_CONSUL=$$(scripts/install-consul.sh) && export MERIDIAN_CONSUL && \
		$(GO) run ./bench/regions -regiond bin/regiond -app bin/guestbook $(REGIONS_FLAGS)

# lint fails on unformatted Go files (generated *.pb.go excepted), go vet
# findings and staticcheck findings.
lint: $(STATICCHECK)
	@unformatted=$$(find . -type f -name '*.go' ! -name '*.pb.go' \
		-not -path './.git/*' -not -path './.tools/*' -not -path './bin/*' \
		-print0 | xargs -0 -r $(GOFMT) -l); \
	if [ -n "$$unformatted" ]; then \
		echo "lint: these files are not gofmt-formatted; run 'gofmt -w' on them:"; \
		echo "$$unformatted" | sed 's/^/  /'; \
		exit 1; \
	fi
	$(GO) vet ./...
	$(STATICCHECK) ./...

# proto lints the protobuf sources and regenerates the Go code beside them.
# Old *.pb.go files are removed first so a deleted .proto leaves nothing behind.
proto: $(BUF) $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)
	@mkdir -p $(PROTOC_PLUGINS)
	@ln -sfn ../bin/$(notdir $(PROTOC_GEN_GO)) $(PROTOC_PLUGINS)/protoc-gen-go
	@ln -sfn ../bin/$(notdir $(PROTOC_GEN_GO_GRPC)) $(PROTOC_PLUGINS)/protoc-gen-go-grpc
	$(BUF) lint
	find proto -type f -name '*.pb.go' -delete
	$(BUF) generate

# proto-check fails if `make proto` (lint included) fails or changes anything
# under proto/ relative to the git index: generated code must be committed.
proto-check: proto
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || \
		{ echo "proto-check: $(CURDIR) is not a git work tree"; exit 1; }
	@changed=$$(git diff --name-status -- proto/); \
	untracked=$$(git ls-files --others --exclude-standard -- proto/); \
	if [ -n "$$changed$$untracked" ]; then \
		echo "proto-check: after 'make proto' these files under proto/ differ from what is committed."; \
		echo "Run 'make proto' and commit each .proto together with its generated code:"; \
		[ -z "$$changed" ] || echo "$$changed" | sed 's/^/  /'; \
		[ -z "$$untracked" ] || echo "$$untracked" | sed 's/^/  untracked: /'; \
		exit 1; \
	fi
	@echo "proto-check: generated code is up to date"

tools: $(STATICCHECK) $(BUF) $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)

# go-install builds package $(2) at version $(3) into the file $(1). It builds
# into a scratch directory and renames, so an interrupted build leaves no tool.
define go-install
	@mkdir -p $(TOOLS_BIN)
	@rm -rf $(1).tmp
	GOBIN=$(1).tmp $(GO) install $(2)@$(3)
	@mv $(1).tmp/$(notdir $(2)) $(1)
	@rm -rf $(1).tmp
endef

$(STATICCHECK):
	$(call go-install,$@,honnef.co/go/tools/cmd/staticcheck,$(STATICCHECK_VERSION))

$(BUF):
	$(call go-install,$@,github.com/bufbuild/buf/cmd/buf,$(BUF_VERSION))

$(PROTOC_GEN_GO):
	$(call go-install,$@,google.golang.org/protobuf/cmd/protoc-gen-go,$(PROTOC_GEN_GO_VERSION))

$(PROTOC_GEN_GO_GRPC):
	$(call go-install,$@,google.golang.org/grpc/cmd/protoc-gen-go-grpc,$(PROTOC_GEN_GO_GRPC_VERSION))

clean:
	rm -rf bin
