package bench

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/unicity-iot/unicity/bench/proxy"
	"github.com/unicity-iot/unicity/config"
	unicity "github.com/unicity-iot/unicity/device" // device is the harness's own type
	"github.com/unicity-iot/unicity/storage"
)

// renewalValidity is the lifetime of the certificates the emulator issues in the renewal
// scenario: with renew_at 0.5 the agent renews every 2 s or so.
const renewalValidity = 4 * time.Second

// renewalSample is what one renewal of the operational certificate measured.
type renewalSample struct {
	// request is from the renewal time to the reconnection (new key, CSR, issueCertificate,
	// the certificate stored on trial); total to the commit (the hub accepted the new
	// certificate, the state names it alone, the old key is removed).
	request, total time.Duration
	tpm            proxy.TPMCounts
}

// renewals measures renewals of the operational certificate through the hub, back to back
// (Options.Runs of them): the time from the renewal time to the commit, and the TPM
// commands each costs, counted by the proxy in front of swtpm.
func (h *harness) renewals(ctx context.Context) error {
	s, err := h.startStack(ctx, "renewal", "--retry-after", fmt.Sprint(int(bootRetryAfter/time.Second)), "--assign-delay", "0s")
	if err != nil {
		return err
	}
	defer s.close()
	t, err := h.startSWTPM(ctx)
	if err != nil {
		return err
	}
	defer t.close()
	d, err := h.renewingDevice(ctx, "bench-renewal", s, t)
	if err != nil {
		return err
	}
	cfg, err := config.Load(d.config)
	if err != nil {
		return err
	}
	a, err := h.startAgent(d, filepath.Join(d.dir, "agent.log"))
	if err != nil {
		return err
	}
	defer a.stop()
	if _, err := a.waitPhase(ctx, "connected", bootTimeout); err != nil {
		return fmt.Errorf("first boot: %w", err)
	}
	samples := make([]renewalSample, 0, h.opts.Runs)
	before := t.proxy.Counts()
	for i := range h.opts.Runs {
		due, err := renewalTime(cfg, d)
		if err != nil {
			return err
		}
		renewed, err := a.waitLine(ctx, "renewal", time.Until(due)+bootTimeout, func(line string) (bool, error) {
			switch {
			case hasField(line, "event", unicity.EventRenewalFailed):
				return false, errors.New("a renewal failed")
			case hasField(line, "event", unicity.EventRenewed) && !hasField(line, "via", unicity.ViaHub):
				return false, errors.New("renewed through DPS, not the hub")
			}
			return hasField(line, "event", unicity.EventRenewed), nil
		})
		if err != nil {
			return fmt.Errorf("renewal %d: %w", i+1, err)
		}
		counts := t.proxy.Counts()
		sample := renewalSample{total: renewed.Sub(due), tpm: counts.Sub(before)}
		before = counts
		for _, l := range a.lines() {
			if l.at.After(due) && !l.at.After(renewed) && hasField(l.text, "phase", "connecting") {
				sample.request = l.at.Sub(due)
				break
			}
		}
		samples = append(samples, sample)
	}
	h.reportRenewals(samples)
	return nil
}

// renewalTime is when the agent renews the operational certificate d's state holds.
func renewalTime(cfg *config.Config, d *device) (time.Time, error) {
	st, err := storage.New(d.state).Load()
	if err != nil {
		return time.Time{}, err
	}
	if len(st.IssuedChain) == 0 {
		return time.Time{}, errors.New("the state holds no operational certificate")
	}
	c, err := x509.ParseCertificate(st.IssuedChain[0])
	if err != nil {
		return time.Time{}, err
	}
	return unicity.RenewalTime(cfg.Certificates, c), nil
}

// renewingDevice makes a device as the factory does (tpmDevice: its onboarding key in swtpm,
// behind the counting proxy, where its operational keys go too), with an individual
// enrollment whose credential policy issues certificates of renewalValidity.
func (h *harness) renewingDevice(ctx context.Context, name string, s *stack, t *swtpm) (*device, error) {
	d, err := h.tpmDevice(ctx, name, s, t)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(d.config, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	_, err = f.WriteString("\n[certificates]\nissuance = \"dps\"\nrenew_at = 0.5\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	emulator := filepath.Join(h.opts.Bin, "unicity-emulator")
	if err := run(ctx, emulator, "enroll", "--dir", h.emuDir, "--registration-id", name, "--cert", filepath.Join(d.dir, "identity.pem")); err != nil {
		return nil, err
	}
	return d, run(ctx, emulator, "policy", "--dir", h.emuDir, "--registration-id", name, "--validity", renewalValidity.String())
}

func (h *harness) reportRenewals(samples []renewalSample) {
	r := h.report
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	collect := func(f func(renewalSample) float64) []float64 {
		out := make([]float64, len(samples))
		for i, s := range samples {
			out[i] = f(s)
		}
		return out
	}
	r.add("renewal: renewal time → committed", "ms", collect(func(s renewalSample) float64 { return ms(s.total) }), "", 0,
		"through the hub, on swtpm: new key, CSR, issueCertificate, stored on trial, reconnection with the new certificate, commit, old key removed")
	r.add("renewal: renewal time → reconnecting", "ms", collect(func(s renewalSample) float64 { return ms(s.request) }), "", 0,
		"new key, CSR, issueCertificate, stored on trial")
	first, last := samples[0].tpm, samples[len(samples)-1].tpm
	note := codes(last)
	if first.Commands != last.Commands {
		// The agent holds its onboarding and its operational key until a renewal needs the
		// slots of one (attest's makeRoom).
		note += "; the first renewal " + codes(first) + ", unloading the onboarding key to make room in swtpm's three object slots"
	}
	r.add("TPM commands per renewal", "", collect(func(s renewalSample) float64 { return float64(s.tpm.Commands) }), "", 0, note)
	r.add("TPM2_Sign per renewal", "", collect(func(s renewalSample) float64 { return float64(s.tpm.ByCode[proxy.CCSign]) }), "==", 2,
		"the CSR and the TLS handshake with the new key")
}
