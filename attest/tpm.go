// Package attest holds the device's identity: it opens the TPM, creates and loads the device
// key as a crypto.Signer, loads and checks the identity certificate chain and applies the DPS
// registration ID rules. It knows nothing of MQTT, DPS or files other than key and
// certificate material, and it does not log. Symmetric-key devices need none of it: their
// SAS tokens are package sas's.
package attest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
)

// DefaultTPM is the kernel TPM behind the resource manager, which virtualises handles per
// open file and flushes them on close, so a crashed agent cannot leak TPM object slots.
const DefaultTPM = "/dev/tpmrm0"

// ErrNoTPM means the TPM named by the configuration cannot be opened or the spec is malformed.
var ErrNoTPM = errors.New("no TPM")

// ErrTPMUnavailable means the TPM did not answer a command for now: it is busy, not ready
// (self-test, lockout, out of memory) or no longer reachable. The TPM's response code or the
// transport's error stays wrapped. Unlike ErrInvalidKey or ErrInvalidIdentity, it may clear
// up: callers retry later.
var ErrTPMUnavailable = errors.New("TPM unavailable")

// tpmRefused reports whether err is the TPM's answer that it will not do what was asked (no
// such handle, a keyfile of another TPM) rather than a TPM that asks to be tried again later
// (a warning: busy, self-testing, locked out, out of memory), is not started or in failure
// mode, or did not answer at all (a transport error, a garbled response).
func tpmRefused(err error) bool {
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) {
		return false
	}
	return !rc.IsWarning() && !errors.Is(rc, tpm2.TPMRCInitialize) && !errors.Is(rc, tpm2.TPMRCFailure)
}

// tpmErrorKind is refused if the TPM refused what err reports, and ErrTPMUnavailable if not.
func tpmErrorKind(err, refused error) error {
	if tpmRefused(err) {
		return refused
	}
	return ErrTPMUnavailable
}

// OpenTPM opens the TPM named by spec: a character device ("/dev/tpmrm0", the default when
// spec is empty, or "/dev/tpm0"), "swtpm:HOST:PORT" (swtpm's TCP data port) or
// "swtpm:/path/to/socket" (its unix socket). The result serialises commands, so it may be
// shared by goroutines: a TPM transport used concurrently without a lock hangs or panics.
func OpenTPM(spec string) (transport.TPMCloser, error) {
	if spec == "" {
		spec = DefaultTPM
	}
	switch {
	case strings.HasPrefix(spec, "/"):
		tpm, err := linuxtpm.Open(spec)
		if err != nil {
			return nil, fmt.Errorf("%w at %s: %w (is the TPM enabled in firmware, and may this user open it?)", ErrNoTPM, spec, err)
		}
		return Locked(tpm), nil
	case strings.HasPrefix(spec, "swtpm:"):
		addr := strings.TrimPrefix(spec, "swtpm:")
		network := "tcp"
		if strings.Contains(addr, "/") {
			network = "unix"
		}
		if addr == "" {
			break
		}
		conn, err := net.Dial(network, addr)
		if err != nil {
			return nil, fmt.Errorf("%w at %s: %w (is swtpm running?)", ErrNoTPM, spec, err)
		}
		return Locked(&swtpmConn{network: network, addr: addr, tpm: transport.FromReadWriteCloser(&wholeResponseConn{Conn: conn})}), nil
	}
	return nil, fmt.Errorf("%w: invalid TPM device %q: want /dev/tpmrm0, /dev/tpm0, swtpm:HOST:PORT or swtpm:/path/to/socket", ErrNoTPM, spec)
}

// Locked wraps tpm so that each command runs alone. OpenTPM's result is already locked;
// this is for transports opened elsewhere (the simulator in tests).
func Locked(tpm transport.TPMCloser) transport.TPMCloser {
	if l, ok := tpm.(*lockedTPM); ok {
		return l
	}
	return &lockedTPM{tpm: tpm}
}

type lockedTPM struct {
	mu  sync.Mutex
	seq sync.Mutex // held across multi-command sequences; see inSequence
	tpm transport.TPMCloser
}

// inSequence runs f, a sequence of commands that holds transient objects (a storage root
// key, a half-loaded key) until its end, with no other such sequence on tpm in between:
// interleaved, two of them could exhaust the TPM's three object slots. Single commands, such
// as signatures, still run between f's commands.
func inSequence(tpm transport.TPM, f func() error) error {
	if l, ok := tpm.(*lockedTPM); ok {
		l.seq.Lock()
		defer l.seq.Unlock()
	}
	return f()
}

func (l *lockedTPM) Send(cmd []byte) ([]byte, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.tpm.Send(cmd)
}

func (l *lockedTPM) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.tpm.Close()
}

// swtpmConn is a connection to swtpm that is dialled again after it broke (swtpm was
// restarted), so that the agent recovers without a restart of its own. A command that
// failed is not sent again: it may have run.
type swtpmConn struct {
	network, addr string
	tpm           transport.TPMCloser // nil after a failure
}

func (c *swtpmConn) Send(cmd []byte) ([]byte, error) {
	if c.tpm == nil {
		conn, err := net.Dial(c.network, c.addr)
		if err != nil {
			return nil, fmt.Errorf("%w at swtpm:%s: %w (is swtpm running?)", ErrNoTPM, c.addr, err)
		}
		c.tpm = transport.FromReadWriteCloser(&wholeResponseConn{Conn: conn})
	}
	rsp, err := c.tpm.Send(cmd)
	if err != nil {
		c.tpm.Close()
		c.tpm = nil
	}
	return rsp, err
}

func (c *swtpmConn) Close() error {
	if c.tpm == nil {
		return nil
	}
	return c.tpm.Close()
}

// wholeResponseConn makes each Read return one complete TPM response: go-tpm reads a
// response with a single Read, which a stream socket may split.
type wholeResponseConn struct {
	net.Conn
}

const tpmHeaderSize = 10 // tag (2), size (4), response code (4)

func (c *wholeResponseConn) Read(p []byte) (int, error) {
	if len(p) < tpmHeaderSize {
		return 0, io.ErrShortBuffer
	}
	if _, err := io.ReadFull(c.Conn, p[:tpmHeaderSize]); err != nil {
		return 0, err
	}
	size := int(binary.BigEndian.Uint32(p[2:6]))
	if size < tpmHeaderSize || size > len(p) {
		return 0, fmt.Errorf("TPM response of %d bytes does not fit a %d-byte buffer", size, len(p))
	}
	if _, err := io.ReadFull(c.Conn, p[tpmHeaderSize:size]); err != nil {
		return 0, err
	}
	return size, nil
}
