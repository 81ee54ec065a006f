package device

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/backoff"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/storage"
)

// ErrStale marks a session that gave up after the hub could not be reached many times in a
// row: the assignment may be out of date, and the agent asks DPS again (rate-limited).
var ErrStale = errors.New("the assigned hub could not be reached repeatedly")

// HubSessions is the Hub over the hub package. One telemetry queue serves every session, so
// messages queued while disconnected, or before a re-registration, are not lost.
type HubSessions struct {
	Config  *config.Config
	RootCAs *x509.CertPool
	Queue   *hub.Queue
	// Configure, when set, completes each session's configuration (C2D, desired properties
	// and method handlers) before the session starts.
	Configure func(*hub.Config)
	// OnState, when set, learns of the live session's connection changes (reconnects).
	OnState func(hub.State)
	// Clock dates SAS tokens; nil means the system clock.
	Clock Clock

	mu      sync.Mutex
	current *hub.Client
}

// NewHubSessions returns the hub side of the agent for cfg.
func NewHubSessions(cfg *config.Config, roots *x509.CertPool) *HubSessions {
	return &HubSessions{Config: cfg, RootCAs: roots, Queue: hub.NewQueue(0, 0)}
}

// Client is the live session's client, or nil between sessions.
func (h *HubSessions) Client() *hub.Client {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.current
}

// Connect starts a session with the assigned hub and returns once it is connected. The
// session then reconnects by itself until the hub refuses the identity (ErrIdentityRejected)
// or [agent] hub_failures attempts fail in a row (ErrStale).
func (h *HubSessions) Connect(ctx context.Context, id *Identity, st *storage.State) (Session, error) {
	network := h.Config.Network()
	hc := hub.Config{
		Hub:      st.AssignedHub,
		DeviceID: st.DeviceID,
		ModelID:  h.Config.Hub.ModelID,
		Dial: dial.Config{
			Transport: network.Transport,
			Prefer:    st.Transport,
			Proxy:     network.Proxy,
			RootCAs:   h.RootCAs,
		},
		Signer:      id.Signer(),
		Clock:       h.Clock,
		MaxFailures: h.Config.Agent.HubFailures,
		Backoff:     backoff.FullJitter(h.Config.Agent.RetryMin, h.Config.Agent.RetryMax),
		Queue:       h.Queue,
		OnState:     h.OnState,
		// Renewal asks the hub it is connected to, over this session (see renew).
		CertificateRenewal: h.Config.Certificates.Issued(),
	}
	if id.X509 != nil {
		cert := id.X509.TLSCertificate()
		hc.Dial.Certificate = &cert
	}
	if h.Configure != nil {
		h.Configure(&hc)
	}
	c, err := hub.New(hc)
	if err != nil {
		return nil, err
	}
	// The session outlives Connect's context, which bounds only the wait for the connection.
	runCtx, cancel := context.WithCancel(context.Background())
	s := &hubSession{client: c, cancel: cancel, done: make(chan struct{})}
	go func() {
		s.err = markHubError(c.Run(runCtx))
		close(s.done)
	}()

	waitCtx, stopWait := context.WithCancel(ctx)
	defer stopWait()
	go func() {
		select {
		case <-s.done:
			stopWait()
		case <-waitCtx.Done():
		}
	}()
	if err := c.AwaitConnection(waitCtx); err != nil {
		select {
		case <-s.done:
			return nil, s.err
		default:
		}
		s.Close()
		if last := c.State().Err; last != nil {
			return nil, Mark(fmt.Errorf("cannot connect to %s: %w", st.AssignedHub, last), ErrUnreachable)
		}
		return nil, err
	}
	h.mu.Lock()
	h.current = c
	h.mu.Unlock()
	s.release = func() {
		h.mu.Lock()
		if h.current == c {
			h.current = nil
		}
		h.mu.Unlock()
	}
	return s, nil
}

func markHubError(err error) error {
	switch {
	case err == nil, errors.Is(err, context.Canceled):
		return err
	case errors.Is(err, hub.ErrNotAuthorized):
		return Mark(err, ErrIdentityRejected)
	case errors.Is(err, hub.ErrGaveUp):
		return Mark(err, ErrStale)
	case errors.Is(err, dial.ErrUnreachable):
		return Mark(err, ErrUnreachable)
	}
	return err
}

type hubSession struct {
	client  *hub.Client
	cancel  context.CancelFunc
	done    chan struct{}
	err     error
	release func()
}

func (s *hubSession) Done() <-chan struct{} { return s.done }
func (s *hubSession) Err() error            { return s.err }

// IssueCertificate asks the hub for a certificate for csr (hub.Client.IssueCertificate).
func (s *hubSession) IssueCertificate(ctx context.Context, csr []byte, replace bool) ([][]byte, error) {
	return s.client.IssueCertificate(ctx, csr, replace)
}

// Close ends the session and waits for it to disconnect.
func (s *hubSession) Close() error {
	s.cancel()
	<-s.done
	if s.release != nil {
		s.release()
	}
	return nil
}
