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
STATICCHECK_VERSION ?= 2025.1.1

.PHONY: all build test lint demo install clean

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

demo: build
	./scripts/demo.sh

install: build
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 bin/unicity $(DESTDIR)$(BINDIR)/unicity
	install -m 0755 bin/unicity-emulator $(DESTDIR)$(BINDIR)/unicity-emulator

clean:
	rm -rf bin dist
