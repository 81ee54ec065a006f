package device

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"time"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/storage"
)

// Renewal of the operational certificate (certificates.md §2): DPS sends no expiry notice, so
// the agent asks for a new certificate, for a new TPM key, at [certificates] renew_at of the
// lifetime: through the hub it is connected to, or by a DPS registration with a CSR when the
// hub's path fails for good. The swap is transactional: the new credential is stored beside
// the one in force (State.Renewal) and replaces it only once the hub has accepted a
// connection with it; the old key is destroyed only then.

// Paths a renewal takes (storage.RenewalResult.Via).
const (
	ViaHub = "hub"
	ViaDPS = "dps"
)

// Renewal states (RenewalStatus.State).
const (
	// RenewalScheduled: the certificate is renewed at NextAt.
	RenewalScheduled = "scheduled"
	// RenewalRequesting: a new certificate has been asked for (Via says where).
	RenewalRequesting = "requesting"
	// RenewalVerifying: the agent connects to the hub with the new certificate, which
	// replaces the old one once the hub accepts it.
	RenewalVerifying = "verifying"
	// RenewalRetrying: the last attempt failed (Last says why); the next is at NextAt.
	RenewalRetrying = "retrying"
)

// RenewalStatus is where the renewal of the operational certificate stands, in the status,
// the local API and the twin.
type RenewalStatus struct {
	State  string    `json:"state"`
	NextAt time.Time `json:"next_at,omitzero"`
	// Via is the path of the attempt under way or next.
	Via string `json:"via,omitempty"`
	// Failures counts the attempts failed in a row.
	Failures int                    `json:"failures,omitempty"`
	Last     *storage.RenewalResult `json:"last,omitempty"`
}

// RenewalTime is when c is due for renewal under cc: at renew_at of its lifetime, moved by up
// to ± renew_jitter of it. The offset comes from c's own bytes, so that each certificate of a
// fleet gets its own time, and the same one at every start and in every command that shows it.
func RenewalTime(cc config.Certificates, c *x509.Certificate) time.Time {
	sum := sha256.Sum256(c.Raw)
	u := float64(binary.BigEndian.Uint64(sum[:8])) / (1 << 64) // in [0, 1)
	share := cc.RenewAt + cc.RenewJitter*(2*u-1)
	life := c.NotAfter.Sub(c.NotBefore)
	return c.NotBefore.Add(time.Duration(share * float64(life)))
}
