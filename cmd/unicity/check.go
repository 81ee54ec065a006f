package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/storage"
)

// checkResult is one preflight check: "pass", "warn" (usable, with a caveat) or "fail".
type checkResult struct {
	Name   string `json:"name"`
	Result string `json:"result"`
	Detail string `json:"detail"`

	err error
}

// checkReport is `unicity check --json`.
type checkReport struct {
	OK     bool          `json:"ok"`
	Checks []checkResult `json:"checks"`
}

// checkTimeout bounds each network check.
const checkTimeout = 10 * time.Second

// expirySoon is when an identity certificate's coming expiry earns a warning.
const expirySoon = 30 * 24 * time.Hour

// runCheck runs the preflight checks a technician needs before (or instead of) reading logs.
// It exits 0 only if nothing failed; the exit code of the first failure otherwise.
func runCheck(ctx context.Context, e *env, args []string) error {
	flags := newFlagSet(e, "check", "[--config FILE] [--tpm DEV] [--json]")
	var tf tpmFlags
	tf.register(flags)
	out := e.jsonFlag(flags, "print one JSON object")
	if err := parseFlags(flags, args); err != nil {
		return err
	}
	var c checker
	c.run(ctx, e, &tf, flags.Lookup("config").Value.String())
	report := checkReport{OK: c.failure == nil, Checks: c.results}
	if out.on {
		if err := out.print(report); err != nil {
			return err
		}
	} else {
		for _, r := range c.results {
			fmt.Fprintf(e.stdout, "%-4s  %-11s  %s\n", r.Result, r.Name, r.Detail)
		}
	}
	if c.failure != nil {
		return fmt.Errorf("check failed: %w", c.failure)
	}
	return nil
}

type checker struct {
	results []checkResult
	failure error
}

func (c *checker) pass(name, format string, a ...any) {
	c.results = append(c.results, checkResult{Name: name, Result: "pass", Detail: fmt.Sprintf(format, a...)})
}

func (c *checker) warn(name, format string, a ...any) {
	c.results = append(c.results, checkResult{Name: name, Result: "warn", Detail: fmt.Sprintf(format, a...)})
}

func (c *checker) fail(name string, err error) {
	c.results = append(c.results, checkResult{Name: name, Result: "fail", Detail: err.Error(), err: err})
	if c.failure == nil {
		c.failure = err
	}
}

func (c *checker) run(ctx context.Context, e *env, tf *tpmFlags, configPath string) {
	cfg, err := config.Load(configPath)
	if err != nil {
		c.fail("config", &exitError{code: exitConfig, err: err})
		return
	}
	c.pass("config", "%s", cfg.Path)
	// Last, whatever the others find: a failure here must not keep the identity unchecked.
	defer c.host(cfg)

	// What the stored assignment must be bound to, once the identity checks out.
	var regID, binding string
	var cert *tls.Certificate
	var tpm *attest.Opener
	switch cfg.Attestation.Method {
	case "symmetric_key":
		regID, binding = c.symmetricKey(ctx, cfg)
	case "tpm":
		regID, binding = c.tpmAttestation(ctx, cfg)
	default:
		tpm = tf.opener(ctx, cfg)
		defer tpm.Close()
		var release func()
		cert, regID, binding, release = c.x509(cfg, tpm)
		defer release()
	}

	roots, err := device.RootCAs(cfg)
	if err != nil {
		c.fail("tls", &exitError{code: exitConfig, err: err})
		return
	}
	certName := "device certificate"
	if cfg.Certificates.Issued() {
		certName = "onboarding certificate"
	}
	c.endpoint(ctx, "dps", cfg, cfg.Provisioning.GlobalEndpoint, "", true, roots, cert, certName)

	st, err := storage.New(cfg.State.Dir).Load()
	switch {
	case errors.Is(err, storage.ErrNotExist):
		c.warn("hub", "not provisioned yet: no hub to check")
	case err != nil:
		c.warn("hub", "%v: the agent will register again", err)
	case binding != "" && !st.BelongsTo(regID, binding):
		c.warn("hub", "the stored assignment belongs to another identity (%s): the agent will register again", st.RegistrationID)
	case !cfg.Certificates.Issued():
		c.endpoint(ctx, "hub", cfg, st.AssignedHub, st.Transport, false, roots, cert, certName)
	default:
		// The hub is reached with the operational certificate; its key is in the TPM the
		// onboarding checks found working.
		var keys keyLoader
		if cert != nil {
			keys = tpm
		}
		opCert, release := c.operational(cfg, st, keys)
		defer release()
		c.endpoint(ctx, "hub", cfg, st.AssignedHub, st.Transport, false, roots, opCert, "operational certificate")
	}
}

// keyLoader loads the key of a certificate (attest.Opener).
type keyLoader interface {
	LoadKey(spec string) (*attest.Key, error)
}

// operational checks the stored operational certificate, with issuance on: a warning past its
// renewal time (device.RenewalTime), a failure once it expired (the agent then registers again
// by itself, with the onboarding identity: the failure is that the certificate in use is
// expired, exit 78 as for any). With keys it loads the certificate's key and returns the TLS
// identity the hub is reached with, and release for the key; nil when it cannot be used.
func (c *checker) operational(cfg *config.Config, st *storage.State, keys keyLoader) (cert *tls.Certificate, release func()) {
	release = func() {}
	t := now()
	op, err := describeOperational(cfg, st, nil)
	switch {
	case err != nil:
		c.fail("operational", err)
		return nil, release
	case op == nil:
		c.warn("operational", "no operational certificate stored: the agent registers with DPS for one")
		return nil, release
	case !t.Before(op.NotAfter):
		c.fail("operational", &exitError{code: exitConfig, err: fmt.Errorf("%w: %s expired on %s; the agent registers again with the onboarding identity",
			device.ErrOperationalExpired, op.SHA256Thumbprint, op.NotAfter.UTC().Format(time.RFC3339))})
		return nil, release
	}
	if keys != nil {
		key, err := keys.LoadKey(op.Key)
		var id *attest.Identity
		if err == nil {
			if id, err = attest.IssuedIdentity(st.IssuedChain, key, t); err != nil {
				key.Close()
			}
		}
		if err != nil {
			c.warn("operational", "%s cannot be used (%v): the agent registers with DPS for a new one with the onboarding identity", op.SHA256Thumbprint, err)
			return nil, release
		}
		tc := id.TLSCertificate()
		cert, release = &tc, func() { key.Close() }
	}
	rn := op.Renewal
	if t.Before(rn.NextAt) {
		c.pass("operational", "%s, valid until %s (%d days left), renewal at %s, key %s", op.SHA256Thumbprint,
			op.NotAfter.UTC().Format(time.RFC3339), op.DaysLeft, rn.NextAt.UTC().Format(time.RFC3339), op.Key)
		return cert, release
	}
	var why string
	switch {
	case rn.Pending != nil:
		why = pendingRenewal(rn.Pending)
	case rn.Last != nil && rn.Last.Result == storage.RenewalFailed:
		why = "the last renewal " + lastRenewal(rn.Last)
	default:
		why = "the agent renews it while it runs"
	}
	c.warn("operational", "%s expires on %s (%d days left), past its renewal time %s: %s", op.SHA256Thumbprint,
		op.NotAfter.UTC().Format(time.RFC3339), op.DaysLeft, rn.NextAt.UTC().Format(time.RFC3339), why)
	return cert, release
}

// host runs the checks `unicity run` makes of what the configuration names on this system.
func (c *checker) host(cfg *config.Config) {
	for _, hc := range cfg.HostChecks(config.AnyOwner) {
		if detail, err := hc.Check(); err != nil {
			c.fail(hc.Name, err)
		} else {
			c.pass(hc.Name, "%s", detail)
		}
	}
}

// x509 checks the TPM, the key, the certificate chain and the clock; it returns the TLS
// identity, the registration ID and the state binding when they pass. release closes the key
// once the network checks are done with it.
func (c *checker) x509(cfg *config.Config, tpm *attest.Opener) (cert *tls.Certificate, regID, binding string, release func()) {
	release = func() {}
	if strings.HasPrefix(cfg.Attestation.IdentityKey, "file:") && !strings.HasPrefix(cfg.Attestation.IdentityCert, "tpm-nv:") {
		c.warn("tpm", "not used: the key is a software key (development only)")
	} else if _, err := tpm.TPM(); err != nil {
		c.fail("tpm", heldBy(cfg, tpm.Spec(), err))
	} else {
		c.pass("tpm", "%s answers", tpm.Spec())
	}

	chain, chainErr := tpm.LoadChain(cfg.Attestation.IdentityCert)
	var key *attest.Key
	if c.failure == nil {
		var err error
		key, err = tpm.LoadKey(cfg.Attestation.IdentityKey)
		if err != nil {
			c.fail("key", err)
		} else {
			release = func() { key.Close() }
		}
	}
	if chainErr != nil {
		c.fail("cert", chainErr)
	}
	if key != nil && chainErr == nil {
		// The certificate of the key, even out of place: the chain check says where it is.
		leaf, _ := attest.FindLeaf(chain, key.Public())
		if leaf == nil {
			leaf = chain[0]
		}
		if err := attest.ProveKey(key, leaf); err != nil {
			c.fail("key", err)
		} else {
			c.pass("key", "%s signs, and the certificate verifies its signature", key.Location)
		}
	}

	t := now()
	if chainErr == nil {
		validFrom := (&device.Credentials{Chain: chain}).ValidFrom()
		if t.Before(validFrom) {
			c.fail("clock", fmt.Errorf("%w: the time is %s, before %s (the build or the certificate's NotBefore); is time sync working?", attest.ErrClockNotSet, t.UTC().Format(time.RFC3339), validFrom.UTC().Format(time.RFC3339)))
		} else {
			c.pass("clock", "%s", t.UTC().Format(time.RFC3339))
		}
	}
	if key != nil && chainErr == nil {
		id, err := attest.NewIdentity(chain, key, t)
		switch {
		case errors.Is(err, attest.ErrExpired):
			c.fail("chain", fmt.Errorf("the onboarding certificate expired (%w): DPS cannot be reached with it (the agent keeps serving a stored assignment while the hub takes it); install a new one (`unicity factory install`), then `systemctl reload unicity`", err))
		case err != nil:
			c.fail("chain", err)
		case chain[0].NotAfter.Sub(t) < expirySoon:
			c.warn("chain", "%s, %d certificate(s); the leaf expires on %s", id.RegistrationID, len(chain), chain[0].NotAfter.UTC().Format(time.RFC3339))
		default:
			c.pass("chain", "%s, %d certificate(s), valid until %s", id.RegistrationID, len(chain), chain[0].NotAfter.UTC().Format(time.RFC3339))
		}
		if err == nil {
			tc := id.TLSCertificate()
			cert = &tc
			regID, binding = id.RegistrationID, certcodec.Thumbprint(chain[0])
		}
	}
	return cert, regID, binding, release
}

// heldBy adds to err, the failure of a TPM that serves one program at a time, who holds it
// when that is the agent: the agent keeps its TPM open for as long as it runs, and its status
// file names its pid.
func heldBy(cfg *config.Config, spec string, err error) error {
	if !errors.Is(err, attest.ErrTPMUnavailable) || !attest.Exclusive(spec) {
		return err
	}
	s, serr := device.ReadStatus(cfg.Runtime.Dir)
	if serr != nil || s.Phase == device.PhaseStopped || s.PID <= 0 || s.PID == os.Getpid() {
		return err
	}
	if kerr := syscall.Kill(s.PID, 0); kerr != nil && !errors.Is(kerr, syscall.EPERM) {
		return err // the agent that wrote it is gone
	}
	return fmt.Errorf("%w; it is held by another process: the agent (pid %d, %s), for as long as it runs; stop it to use the TPM (systemctl stop unicity)",
		err, s.PID, s.Phase)
}

// symmetricKey checks the key file of a symmetric-key device and the clock its tokens are
// dated by; it returns the registration ID and state binding when both pass.
func (c *checker) symmetricKey(ctx context.Context, cfg *config.Config) (regID, binding string) {
	creds, err := device.OpenCredentials(ctx, cfg)
	if err != nil {
		c.fail("key", err)
		return "", ""
	}
	defer creds.Close()
	detail := "device key"
	if cfg.Attestation.SymmetricKeyGroup {
		detail = "enrollment group key; the device key is derived for " + cfg.Provisioning.RegistrationID
	}
	c.pass("key", "%s: symmetric key (%s), readable by its owner only; no TPM or certificate used", cfg.Attestation.SymmetricKey, detail)
	t := now()
	id, err := creds.Identity(t)
	if err != nil {
		c.fail("clock", fmt.Errorf("%w; is time sync working?", err))
		return "", ""
	}
	c.pass("clock", "%s", t.UTC().Format(time.RFC3339))
	return id.RegistrationID, creds.StateBinding()
}

// tpmAttestation checks the TPM of TPM attestation: its EK, its SRK (created if missing, as
// the agent would) and whether DPS's identity key is imported yet.
func (c *checker) tpmAttestation(ctx context.Context, cfg *config.Config) (regID, binding string) {
	r, err := newTPMIdentityReport(ctx, cfg)
	if err != nil {
		c.fail("tpm", err)
		return "", ""
	}
	c.pass("tpm", "%s: EK SHA-256 %s (registration ID %s), SRK %s", cfg.TPM.Device, r.EndorsementKeySHA256, r.RegistrationID, r.srkLine())
	if r.IdentityKeyImported {
		c.pass("key", "%s", r.keyLine())
	} else {
		c.warn("key", "%s", r.keyLine())
	}
	return r.RegistrationID, r.StateBinding
}

// endpoint checks DNS, TCP and TLS (with the device's certificate, when it has one: certName
// says which) to host, over the transports the service speaks: DPS has HTTPS too (restAPI),
// the hub only MQTT. Through a proxy, only the TLS check applies.
func (c *checker) endpoint(ctx context.Context, name string, cfg *config.Config, host, prefer string, restAPI bool, roots *x509.CertPool, cert *tls.Certificate, certName string) {
	network := cfg.Network()
	transport := network.Transport
	hostname, port := host, ""
	if h, p, err := net.SplitHostPort(host); err == nil {
		hostname, port = h, p
	}
	viaProxy := network.Proxy != "" || os.Getenv("https_proxy") != "" || os.Getenv("HTTPS_PROXY") != ""
	if !viaProxy {
		dctx, cancel := context.WithTimeout(ctx, checkTimeout)
		addrs, err := net.DefaultResolver.LookupHost(dctx, hostname)
		cancel()
		if err != nil {
			c.fail(name+" dns", device.Mark(fmt.Errorf("cannot resolve %s: %w", hostname, err), device.ErrUnreachable))
			return
		}
		c.pass(name+" dns", "%s is %s", hostname, strings.Join(addrs, ", "))

		ports := []string{port}
		if port == "" {
			switch transport {
			case dial.TransportMQTT:
				ports = []string{"8883"}
			case dial.TransportWebSocket, dial.TransportHTTPS:
				ports = []string{"443"}
			default:
				ports = []string{"8883", "443"}
			}
		}
		var tcpErr error
		for i, p := range ports {
			addr := net.JoinHostPort(hostname, p)
			conn, err := (&net.Dialer{Timeout: checkTimeout}).DialContext(ctx, "tcp", addr)
			if err == nil {
				conn.Close()
				if i == 0 {
					c.pass(name+" tcp", "%s accepts connections", addr)
				} else {
					c.warn(name+" tcp", "%s accepts connections, but %v (a transport on 443 will be used)", addr, tcpErr)
				}
				tcpErr = nil
				break
			}
			tcpErr = err
		}
		if tcpErr != nil {
			c.fail(name+" tcp", device.Mark(fmt.Errorf("cannot connect to %s: %w", host, tcpErr), device.ErrUnreachable))
			return
		}
	}

	conn, used, err := dial.Dial(ctx, dial.Config{
		Host: host, Transport: transport, Prefer: prefer, HTTPS: restAPI, Proxy: network.Proxy,
		RootCAs: roots, Certificate: cert, Timeout: checkTimeout,
	})
	if err != nil {
		c.fail(name+" tls", device.Mark(err, device.ErrUnreachable))
		return
	}
	conn.Close()
	how := "server verified"
	if cert != nil {
		how = "server verified, " + certName + " offered"
	}
	if viaProxy {
		how += ", through the proxy"
	}
	c.pass(name+" tls", "%s over %s: %s", host, used, how)
}
