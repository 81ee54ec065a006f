// Package attest holds the device's identity: it opens the TPM, creates and loads the device
// key as a crypto.Signer, loads and checks the identity certificate chain and applies the DPS
// registration ID rules. It knows nothing of MQTT, DPS or files other than key and
// certificate material, and it does not log. Symmetric-key devices need none of it: their
// SAS tokens are package sas's.
package attest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

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

// CommandTimeout bounds every TPM command but key generation. A TPM answers in
// milliseconds (a slow discrete chip in tens to hundreds of milliseconds); one that has not
// answered in 5 s is held by another program (swtpm serves one at a time) or wedged. The
// connection is then dropped, and the command fails with ErrTPMUnavailable: nothing that
// waits on a TPM can hang on it.
const CommandTimeout = 5 * time.Second

// KeyGenerationTimeout bounds TPM2_Create and TPM2_CreatePrimary, which generate keys: an
// ECC key takes milliseconds, but an RSA-2048 key (an endorsement key, an RSA storage root
// key, `factory keygen --alg rsa-2048`) takes seconds on a slow chip, and its prime search
// sometimes far longer.
const KeyGenerationTimeout = 2 * time.Minute

// cleanupTimeout bounds the flushes that still run once the context of an open TPM has ended,
// so that a stopping program leaves nothing loaded without waiting on a TPM that is gone.
const cleanupTimeout = time.Second

// TPM is an open TPM. It runs one command at a time, so goroutines may share it (a TPM
// transport used concurrently without a lock hangs or panics), and bounds each command (see
// CommandTimeout). The connection is made again after it broke (swtpm restarted, a command
// overran), so that a long-running agent recovers by itself; a command that failed is not sent
// again: it may have run.
type TPM struct {
	spec string
	// dial makes the connection again; nil for a transport opened elsewhere (Locked).
	dial func(context.Context) (transport.TPMCloser, error)
	// exclusive: no resource manager stands between this program and the TPM (see Exclusive).
	exclusive bool
	// ctx ends every wait on the TPM; once it is done, only flushes run (see cleanupTimeout).
	ctx context.Context
	// timeout is CommandTimeout but in tests.
	timeout time.Duration

	mu   sync.Mutex
	seq  sync.Mutex // held across multi-command sequences; see inSequence
	conn transport.TPMCloser
	// held counts the transient objects that this program's Keys hold, by handle: the
	// objects a reclaim keeps.
	held map[tpm2.TPMHandle]int
	// idle are this program's keyfile Keys, which may be flushed while no signature uses
	// them and loaded again at the next (see evictFor).
	idle   map[*Key]struct{}
	closed bool
}

var _ transport.TPMCloser = (*TPM)(nil)

// Exclusive reports whether the TPM named by spec serves one program at a time, with no
// resource manager between them: swtpm (one client connection at a time) and /dev/tpm0 (one
// opener), not /dev/tpmrm0. Transient objects and sessions a program left loaded in such a TPM
// stay until someone flushes them, and no one else can use them while this program holds it.
func Exclusive(spec string) bool {
	if spec == "" {
		spec = DefaultTPM
	}
	return strings.HasPrefix(spec, "swtpm:") || !strings.HasPrefix(filepath.Base(spec), "tpmrm")
}

// OpenTPM opens the TPM named by spec: a character device ("/dev/tpmrm0", the default when
// spec is empty, or "/dev/tpm0"), "swtpm:HOST:PORT" (swtpm's TCP data port) or
// "swtpm:/path/to/socket" (its unix socket), and checks that it answers. ctx bounds the TPM's
// use: when it ends, a command in flight fails at once with ErrTPMUnavailable.
//
// A TPM that is Exclusive is this program's alone while it is open, so whatever is loaded in
// it when it is opened belongs to programs that are gone (a killed agent leaves its key): the
// transient objects and loaded sessions are flushed, here and whenever the connection is made
// again or a key does not load for lack of TPM memory, except those of this program's Keys.
//
// A device or socket that does not exist is ErrNoTPM matching fs.ErrNotExist; a TPM held by
// another program (/dev/tpm0 is busy) or that does not answer is ErrTPMUnavailable.
func OpenTPM(ctx context.Context, spec string) (*TPM, error) {
	return openTPM(ctx, spec, CommandTimeout)
}

func openTPM(ctx context.Context, spec string, timeout time.Duration) (*TPM, error) {
	if spec == "" {
		spec = DefaultTPM
	}
	t := &TPM{spec: spec, exclusive: Exclusive(spec), ctx: ctx, timeout: timeout, held: map[tpm2.TPMHandle]int{}, idle: map[*Key]struct{}{}}
	switch {
	case strings.HasPrefix(spec, "/"):
		t.dial = func(context.Context) (transport.TPMCloser, error) {
			tpm, err := linuxtpm.Open(spec)
			switch {
			case errors.Is(err, syscall.EBUSY):
				return nil, fmt.Errorf("%w: %s is open in another program (it allows one at a time: is the agent running?): %w", ErrTPMUnavailable, spec, err)
			case err != nil:
				return nil, fmt.Errorf("%w at %s: %w (is the TPM enabled in firmware, and may this user open it?)", ErrNoTPM, spec, err)
			}
			return tpm, nil
		}
	case strings.HasPrefix(spec, "swtpm:") && spec != "swtpm:":
		addr := strings.TrimPrefix(spec, "swtpm:")
		network := "tcp"
		if strings.Contains(addr, "/") {
			network = "unix"
		}
		t.dial = func(ctx context.Context) (transport.TPMCloser, error) {
			var d net.Dialer
			conn, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, fmt.Errorf("%w at %s: %w (is swtpm running?)", ErrNoTPM, spec, err)
			}
			return transport.FromReadWriteCloser(&wholeResponseConn{Conn: conn}), nil
		}
	default:
		return nil, fmt.Errorf("%w: invalid TPM device %q: want /dev/tpmrm0, /dev/tpm0, swtpm:HOST:PORT or swtpm:/path/to/socket", ErrNoTPM, spec)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.connect(); err != nil {
		return nil, err
	}
	return t, nil
}

// Locked wraps a transport opened elsewhere (the simulator in tests) so that each command
// runs alone and within its deadline; it is not reconnected, and nothing in it is flushed.
// A *TPM is returned as it is.
func Locked(tpm transport.TPMCloser) *TPM {
	if t, ok := tpm.(*TPM); ok {
		return t
	}
	return &TPM{spec: "TPM", ctx: context.Background(), timeout: CommandTimeout, conn: tpm, held: map[tpm2.TPMHandle]int{}, idle: map[*Key]struct{}{}}
}

// inSequence runs f, a sequence of commands that holds transient objects (a storage root
// key, a half-loaded key) until its end, with no other such sequence on tpm in between:
// interleaved, two of them could exhaust the TPM's three object slots. Single commands, such
// as signatures, still run between f's commands.
func inSequence(tpm transport.TPM, f func() error) error {
	if t, ok := tpm.(*TPM); ok {
		t.seq.Lock()
		defer t.seq.Unlock()
	}
	return f()
}

// Send runs one command, within its deadline.
func (t *TPM) Send(cmd []byte) ([]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, fmt.Errorf("%w: %s is closed", ErrTPMUnavailable, t.spec)
	}
	stopping := t.ctx.Err() != nil
	if stopping && commandCode(cmd) != tpm2.TPMCCFlushContext {
		return nil, fmt.Errorf("%w: %s: %w", ErrTPMUnavailable, t.spec, context.Cause(t.ctx))
	}
	if t.conn == nil {
		if t.dial == nil || stopping {
			return nil, fmt.Errorf("%w: %s stopped answering", ErrTPMUnavailable, t.spec)
		}
		if err := t.connect(); err != nil {
			return nil, err
		}
	}
	return t.exchange(cmd)
}

// Close flushes nothing (Keys flush their own objects) and closes the connection.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	if t.conn == nil {
		return nil
	}
	err := t.conn.Close()
	t.conn = nil
	return err
}

// connect dials and proves that the TPM answers; for an Exclusive TPM, it flushes what the
// programs before this one left. t.mu is held.
func (t *TPM) connect() error {
	conn, err := t.dial(t.ctx)
	if err != nil {
		return err
	}
	t.conn = conn
	if _, err := t.reclaim(); err != nil {
		if !errors.Is(err, ErrTPMUnavailable) {
			err = fmt.Errorf("%w: %s: %w", ErrTPMUnavailable, t.spec, err)
		}
		t.drop()
		return err
	}
	return nil
}

// exchange runs cmd on the connection. A command that overruns its deadline, or is cut short
// by t.ctx, drops the connection: its answer may still come, and would be taken for the next
// command's. A transport that ignores Close (a blocking device read) keeps one goroutine until
// the driver returns. t.mu is held.
func (t *TPM) exchange(cmd []byte) ([]byte, error) {
	type answer struct {
		rsp []byte
		err error
	}
	conn := t.conn
	done := make(chan answer, 1)
	go func() {
		rsp, err := conn.Send(cmd)
		done <- answer{rsp, err}
	}()
	timeout, interrupt := t.timeout, t.ctx.Done()
	if cc := commandCode(cmd); cc == tpm2.TPMCCCreate || cc == tpm2.TPMCCCreatePrimary {
		timeout = max(timeout, KeyGenerationTimeout)
	}
	if interrupt != nil && t.ctx.Err() != nil {
		timeout, interrupt = cleanupTimeout, nil
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case a := <-done:
		if a.err != nil && t.dial != nil {
			t.drop() // made again for the next command
		}
		return a.rsp, a.err
	case <-timer.C:
		t.drop()
		return nil, fmt.Errorf("%w: %s did not answer within %s%s", ErrTPMUnavailable, t.spec, timeout, t.busyHint())
	case <-interrupt:
		t.drop()
		return nil, fmt.Errorf("%w: %s: command interrupted: %w", ErrTPMUnavailable, t.spec, context.Cause(t.ctx))
	}
}

func (t *TPM) busyHint() string {
	if strings.HasPrefix(t.spec, "swtpm:") {
		return " (swtpm serves one program at a time: does another one hold it?)"
	}
	return ""
}

// drop closes the connection, if it is still there.
func (t *TPM) drop() {
	if t.conn != nil {
		t.conn.Close()
		t.conn = nil
	}
}

// raw runs commands on t whose lock the caller holds.
type raw struct{ t *TPM }

func (r raw) Send(cmd []byte) ([]byte, error) {
	if r.t.conn == nil {
		return nil, fmt.Errorf("%w: %s stopped answering", ErrTPMUnavailable, r.t.spec)
	}
	return r.t.exchange(cmd)
}

// Handle ranges of TPM2_GetCapability(TPM_CAP_HANDLES).
const (
	firstTransient     = 0x80000000
	firstLoadedSession = 0x02000000
)

// reclaim lists the TPM's transient objects and loaded sessions and, on an Exclusive TPM,
// flushes those no Key of this program holds: the objects and sessions of programs that
// died, or of a sequence of this one that failed. (Sessions saved by their owner, as tpm2-tools
// does, are not loaded, and stay.) It returns how many it flushed. t.mu is held.
func (t *TPM) reclaim() (int, error) {
	flushed := 0
	for _, first := range []uint32{firstTransient, firstLoadedSession} {
		r, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: first, PropertyCount: 64}.Execute(raw{t})
		if err != nil {
			return flushed, err
		}
		handles, err := r.CapabilityData.Data.Handles()
		if err != nil {
			return flushed, err
		}
		if !t.exclusive {
			return 0, nil // the query was the proof that it answers
		}
		for _, h := range handles.Handle {
			if t.held[h] > 0 {
				continue
			}
			if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(raw{t}); err != nil {
				if errors.Is(err, ErrTPMUnavailable) {
					return flushed, err
				}
				continue // gone meanwhile
			}
			flushed++
		}
	}
	return flushed, nil
}

// reclaimFor flushes what no Key holds in tpm when it is an Exclusive TPM; see reclaim. It
// reports whether anything was flushed.
func reclaimFor(tpm transport.TPM) bool {
	t, ok := tpm.(*TPM)
	if !ok || !t.exclusive {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.conn == nil {
		return false
	}
	n, _ := t.reclaim()
	return n > 0
}

// evictFor makes room in a TPM that is out of object memory by flushing this program's
// keyfile Keys that no signature is using (except, the one being loaded); each loads again
// at its next signature. A TPM of a few slots (swtpm has 3) holds the onboarding key and the
// operational one, and making the next operational key needs the storage root key beside
// them. It reports whether it flushed any.
func evictFor(tpm transport.TPM, except *Key) bool {
	t, ok := tpm.(*TPM)
	if !ok {
		return false
	}
	t.mu.Lock()
	keys := make([]*Key, 0, len(t.idle))
	for k := range t.idle {
		if k != except {
			keys = append(keys, k)
		}
	}
	t.mu.Unlock()
	evicted := false
	for _, k := range keys {
		evicted = k.evict() || evicted
	}
	return evicted
}

// idleKey adds a keyfile Key to the ones evictFor may flush; forgetKey removes it.
func idleKey(tpm transport.TPM, k *Key) {
	if t, ok := tpm.(*TPM); ok {
		t.mu.Lock()
		t.idle[k] = struct{}{}
		t.mu.Unlock()
	}
}

func forgetKey(tpm transport.TPM, k *Key) {
	if t, ok := tpm.(*TPM); ok {
		t.mu.Lock()
		delete(t.idle, k)
		t.mu.Unlock()
	}
}

// hold and release count the transient objects of this program's Keys, which reclaim keeps.
func hold(tpm transport.TPM, h tpm2.TPMHandle) {
	if t, ok := tpm.(*TPM); ok && h != 0 {
		t.mu.Lock()
		t.held[h]++
		t.mu.Unlock()
	}
}

func release(tpm transport.TPM, h tpm2.TPMHandle) {
	if t, ok := tpm.(*TPM); ok && h != 0 {
		t.mu.Lock()
		if t.held[h]--; t.held[h] <= 0 {
			delete(t.held, h)
		}
		t.mu.Unlock()
	}
}

// commandCode is the command code in a TPM command's header (tag, size, code).
func commandCode(cmd []byte) tpm2.TPMCC {
	if len(cmd) < tpmHeaderSize {
		return 0
	}
	return tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10]))
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
