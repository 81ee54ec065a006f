package device

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/storage"
)

// DPS is the Provisioner over the dps package, configured from [provisioning] and [tls].
type DPS struct {
	Config  *config.Config
	RootCAs *x509.CertPool
	Clock   Clock
	// Progress receives what the registration is doing (connected, throttled, polling).
	Progress func(dps.Progress)
}

// NewDPS returns the provisioner for cfg, with the trust bundle loaded.
func NewDPS(cfg *config.Config) (*DPS, error) {
	roots, err := RootCAs(cfg)
	if err != nil {
		return nil, err
	}
	return &DPS{Config: cfg, RootCAs: roots}, nil
}

// RootCAs is Azure's roots plus the configured trust bundle.
func RootCAs(cfg *config.Config) (*x509.CertPool, error) {
	var extra []byte
	if cfg.TLS.TrustBundle != "" {
		b, err := os.ReadFile(cfg.TLS.TrustBundle)
		if err != nil {
			return nil, &config.Error{File: cfg.Path, Key: "tls.trust_bundle", Err: err}
		}
		extra = b
	}
	pool, err := dial.RootPool(extra)
	if err != nil {
		return nil, &config.Error{File: cfg.Path, Key: "tls.trust_bundle", Err: fmt.Errorf("%s: %w", cfg.TLS.TrustBundle, err)}
	}
	return pool, nil
}

// Register makes one dps.Register call and marks its errors for the lifecycle.
func (p *DPS) Register(ctx context.Context, id *Identity, prev *storage.State) (*storage.State, error) {
	pc, network := p.Config.Provisioning, p.Config.Network()
	req := dps.Request{
		Endpoint:       pc.GlobalEndpoint,
		IDScope:        pc.IDScope,
		RegistrationID: id.RegistrationID,
		Transport:      network.Transport,
		Proxy:          network.Proxy,
		RootCAs:        p.RootCAs,
		SymmetricKey:   id.SymmetricKey,
		CSRSigner:      id.CSR,
		Progress:       p.Progress,
	}
	if id.X509 != nil {
		cert := id.X509.TLSCertificate()
		req.Certificate = &cert
	}
	if id.TPM != nil {
		req.TPM = &dps.TPM{EndorsementKey: id.TPM.EK.Public, StorageRootKey: id.TPM.SRK.Public, Activate: id.TPM.Activate}
	}
	if pc.Payload != "" {
		req.Payload = json.RawMessage(pc.Payload)
	}
	if prev != nil {
		req.PreferTransport = prev.Transport
	}
	if p.Clock != nil {
		req.Clock = p.Clock
	}
	a, err := dps.Register(ctx, req)
	if err != nil {
		return nil, markDPSError(err)
	}
	return &storage.State{
		AssignedHub:  a.AssignedHub,
		DeviceID:     a.DeviceID,
		Substatus:    a.Substatus,
		Transport:    a.Transport,
		Payload:      a.Payload,
		IssuedChain:  a.IssuedChain,
		DPSCreatedAt: a.CreatedAt,
		DPSUpdatedAt: a.UpdatedAt,
	}, nil
}

func markDPSError(err error) error {
	var de *dps.Error
	switch {
	case errors.Is(err, dps.ErrRefused), errors.Is(err, attest.ErrNotThisTPM):
		return Mark(err, ErrRefused)
	case errors.Is(err, dps.ErrNotIssued), errors.Is(err, dps.ErrMQTT5), errors.Is(err, dps.ErrConnectionProfile):
		// The enrollment or the hub must change: the agent parks, the status saying which.
		return Mark(err, ErrRefused)
	case errors.Is(err, dps.ErrUnreachable):
		return Mark(err, ErrUnreachable)
	case errors.As(err, &de) && de.RetryAfter > 0:
		return &RetryAfterError{After: de.RetryAfter, Err: Mark(err, ErrTemporary)}
	case errors.As(err, &de) && de.Temporary():
		return Mark(err, ErrTemporary)
	}
	return err
}
