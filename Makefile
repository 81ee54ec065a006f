# unicity: build, test and package. Every target works on a fresh Debian 12 machine after
# .ci/run has installed the test dependencies.

GO       ?= go
PREFIX   ?= /usr/local
BINDIR   ?= $(PREFIX)/bin
DESTDIR  ?=
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT   ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
COMMIT_UNIX ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)

PKG      := github.com/unicity-iot/unicity
LDFLAGS  := -s -w -X $(PKG)/internal/version.Version=$(VERSION) \
            -X $(PKG)/internal/version.Commit=$(COMMIT) \
            -X $(PKG)/internal/version.CommitUnix=$(COMMIT_UNIX)
GOBUILD  := CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)'
STATICCHECK_VERSION ?= v0.8.2
GOVULNCHECK_VERSION ?= v1.9.0
# How long `make fuzz` runs each fuzz target; README "Reliability" has a 10-minute run.
FUZZTIME ?= 10s
FUZZ_PKGS := ./dps ./hub ./storage ./config ./attest ./spool

# Packaging (docs/oem.md). cross: static binaries for the gateway architectures, with the
# arm64 agent held to a flash budget. deb: a Debian package built by nfpm, fetched through the
# Go module proxy like any module (v2.45.0 is the newest whose dependencies the proxy serves).
DIST          ?= dist
CROSS_ARCHES  ?= amd64 arm64 arm riscv64
EMULATOR_ARCHES ?= amd64 arm64
MAX_ARM64_BYTES ?= 12000000
NFPM_VERSION  ?= v2.45.0
DEB_GOARCH    ?= $(shell $(GO) env GOARCH)
DEB_ARCH      ?= $(if $(filter arm,$(DEB_GOARCH)),armhf,$(DEB_GOARCH))
# Debian versions start with a digit: a v-tag gives 1.2.0+3+gabcdef, an untagged tree
# 0.0.0+git<commit time>+<commit>.
DEB_VERSION   ?= $(shell v='$(VERSION)'; case "$$v" in (v[0-9]*) ;; (*) v="0.0.0+git$(COMMIT_UNIX)+$$v";; esac; echo "$$v" | sed 's/^v//; s/-/+/g')
DEB_MAINTAINER ?= unicity maintainers <unicity@unicity-iot.invalid>

.PHONY: all build test lint demo install clean cross deb reliability fuzz vulncheck bench

all: build

build:
	$(GOBUILD) -o bin/unicity ./cmd/unicity
	$(GOBUILD) -o bin/unicity-emulator ./cmd/unicity-emulator

# The TPM simulator needs cgo (gcc, libssl-dev); the shipped binary does not.
test:
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 30m ./...

lint:
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

# The fault suites' long forms (reliability/): every stall at every TLS record, 200 power
# cuts of the real agent, 200 SIGKILLs of a process appending to the telemetry spool and 200
# of one submitting telemetry and forwarding it to the emulated hub. Their short forms run in
# `make test`.
reliability:
	RELIABILITY_LONG=1 CGO_ENABLED=1 $(GO) test -count=1 -timeout 60m -v ./reliability/ ./internal/faultnet/
	RELIABILITY_LONG=1 CGO_ENABLED=1 $(GO) test -count=1 -timeout 10m -v -run '^TestSurvivesSIGKILL$$' ./spool/ ./telemetry/

# Every fuzz target for FUZZTIME each (go test fuzzes one target per run). A failure counts
# when it wrote a failing input to testdata/fuzz/: go1.26's coordinator can end a timed run
# with a bare "context deadline exceeded" and no input (go.dev/issue/75804), which is
# reported and not counted.
fuzz:
	@set -e; for pkg in $(FUZZ_PKGS); do \
		for f in $$(CGO_ENABLED=1 $(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			echo "fuzz $$pkg $$f for $(FUZZTIME)"; \
			before=$$(ls $$pkg/testdata/fuzz/$$f 2>/dev/null | wc -l); \
			out=$$(CGO_ENABLED=1 $(GO) test -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) $$pkg 2>&1) && rc=0 || rc=$$?; \
			echo "$$out" | grep -E '^fuzz: elapsed' | tail -1; \
			if [ $$rc -ne 0 ]; then \
				after=$$(ls $$pkg/testdata/fuzz/$$f 2>/dev/null | wc -l); \
				if [ "$$after" = "$$before" ] && echo "$$out" | grep -q '^    context deadline exceeded$$'; then \
					echo "  ended on Go's fuzz deadline race (go.dev/issue/75804): no failing input"; \
				else echo "$$out"; exit 1; fi; \
			fi; \
		done; \
	done

# Known vulnerabilities in the code paths the module reaches (needs vuln.go.dev).
vulncheck:
	$(GO) run golang.org/x/vuln/cmd/govulncheck@$(GOVULNCHECK_VERSION) ./...

demo: build
	./scripts/demo.sh

# The benchmark suite (bench/README.md): the built agent against the emulator on loopback, one
# table on stdout and the same as JSON in BENCH_JSON. BENCH_FLAGS=-short is the CI variant.
BENCH_JSON  ?= bin/bench.json
BENCH_FLAGS ?=
bench: build
	$(GO) run ./bench/cmd/unicity-bench -bin bin -dist $(DIST) -json $(BENCH_JSON) $(BENCH_FLAGS)

install: build
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 bin/unicity $(DESTDIR)$(BINDIR)/unicity
	install -m 0755 bin/unicity-emulator $(DESTDIR)$(BINDIR)/unicity-emulator

# GOARM only matters for arm, where ARMv7 (hard float) is the gateway baseline.
cross:
	@mkdir -p $(DIST)
	@set -e; for arch in $(CROSS_ARCHES); do \
		echo "build unicity linux/$$arch"; \
		GOOS=linux GOARCH=$$arch GOARM=7 $(GOBUILD) -o $(DIST)/unicity-linux-$$arch ./cmd/unicity; \
	done
	@set -e; if [ -d cmd/unicity-emulator ]; then for arch in $(EMULATOR_ARCHES); do \
		echo "build unicity-emulator linux/$$arch"; \
		GOOS=linux GOARCH=$$arch $(GOBUILD) -o $(DIST)/unicity-emulator-linux-$$arch ./cmd/unicity-emulator; \
	done; fi
	@echo "size report (stripped, static):"
	@for f in $(DIST)/unicity-linux-* $(DIST)/unicity-emulator-linux-*; do \
		[ -f "$$f" ] && stat -c '%s %n' "$$f"; done | awk '{ printf "  %-40s %10d bytes %6.2f MB\n", $$2, $$1, $$1/1e6 }'
	@size=$$(stat -c %s $(DIST)/unicity-linux-arm64); \
	if [ "$$size" -gt $(MAX_ARM64_BYTES) ]; then \
		echo "FAIL: $(DIST)/unicity-linux-arm64 is $$size bytes, over the $(MAX_ARM64_BYTES)-byte budget" >&2; exit 1; \
	else echo "arm64 agent: $$size bytes, budget $(MAX_ARM64_BYTES)"; fi

# nfpm expands variables in the package fields but not in file sources: the agent is staged
# at the fixed path packaging/nfpm.yaml names.
deb:
	@mkdir -p $(DIST) bin/deb
	GOOS=linux GOARCH=$(DEB_GOARCH) GOARM=7 $(GOBUILD) -o bin/deb/unicity ./cmd/unicity
	SOURCE_DATE_EPOCH=$(COMMIT_UNIX) DEB_ARCH=$(DEB_ARCH) DEB_VERSION='$(DEB_VERSION)' DEB_MAINTAINER='$(DEB_MAINTAINER)' \
		$(GO) run github.com/goreleaser/nfpm/v2/cmd/nfpm@$(NFPM_VERSION) package \
		--config packaging/nfpm.yaml --packager deb --target $(DIST)/unicity_$(DEB_VERSION)_$(DEB_ARCH).deb

clean:
	rm -rf bin dist
