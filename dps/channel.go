package dps

import (
	"context"
	"errors"
	"fmt"

	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/sas"
)

// channel carries a registration's requests to DPS and brings back its replies: an MQTT
// session (session.go) or the REST API over HTTPS (https.go). Whatever carried it, a reply
// is handled, paced and retried the same way (dps.go).
type channel interface {
	// request sends a register request, or with an operation ID a poll, and returns DPS's
	// reply. Its errors are *Error or ctx's.
	request(ctx context.Context, operationID string) (*reply, error)
	close()
}

// connect opens a channel over the first transport that works, trying the one that worked
// last first, and returns it with that transport's name.
func (r *registration) connect(ctx context.Context) (channel, string, error) {
	cfg := r.dial
	if r.transport != "" {
		cfg.Prefer = r.transport
	}
	conn, transport, err := dial.Dial(ctx, cfg)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return nil, "", ctx.Err()
	case errors.Is(err, dial.ErrUnreachable):
		return nil, "", unreachable("cannot reach DPS at "+r.req.Endpoint, err)
	default:
		return nil, "", fmt.Errorf("cannot connect to DPS: %w", err)
	}
	r.transport = transport
	if transport == dial.TransportHTTPS {
		r.progress(Progress{Message: "connected to DPS over " + transport})
		return r.httpsChannel(conn), transport, nil
	}
	s, err := r.mqttSession(ctx, conn, transport)
	if err != nil {
		return nil, "", err
	}
	return s, transport, nil
}

// sasToken is the SAS token a request authenticates with: signed with the TPM's identity key
// once TPM attestation's challenge is answered, with the symmetric key, or none for X.509.
func (r *registration) sasToken(ctx context.Context) (string, error) {
	resource := r.req.IDScope + "/registrations/" + r.regID
	expiry := r.clock.Now().Add(sasLifetime)
	switch {
	case r.signer != nil:
		tok, err := sas.SignedToken(ctx, r.signer, resource, expiry, "registration")
		if err != nil {
			return "", fmt.Errorf("cannot sign the SAS token for DPS: %w", err)
		}
		return tok, nil
	case r.symmetricKey != nil:
		return sas.Token(r.symmetricKey, resource, expiry, "registration"), nil
	}
	return "", nil
}
