package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/localapi"
	"github.com/unicity-iot/unicity/storage"
)

// statusReport is `unicity status --json`.
type statusReport struct {
	RegistrationID   string    `json:"registration_id"`
	Attestation      string    `json:"attestation"`
	SHA256Thumbprint string    `json:"sha256_thumbprint,omitempty"`
	NotAfter         time.Time `json:"not_after,omitzero"`
	IdentityError    string    `json:"identity_error,omitempty"`
	// Certificates, with [certificates] issuance = "dps": the onboarding certificate (for DPS)
	// and the stored operational one (for the hub), when there is one.
	Certificates []device.CertificateInfo `json:"certificates,omitempty"`
	// Credential is which one the running agent reaches the hub with.
	Credential device.CredentialState `json:"credential,omitempty"`
	// Onboarding is the running agent's word on the onboarding certificate: expired, or a
	// roll pending.
	Onboarding *device.OnboardingStatus `json:"onboarding,omitempty"`
	// TPM attestation, from the configuration and the state: status leaves the TPM to the
	// agent (swtpm serves one program at a time).
	EndorsementKeySHA256 string `json:"endorsement_key_sha256,omitempty"`
	SRKHandle            string `json:"srk_handle,omitempty"`
	IdentityKey          string `json:"identity_key,omitempty"`

	AssignedHub   string    `json:"assigned_hub"`
	DeviceID      string    `json:"device_id"`
	Substatus     string    `json:"substatus"`
	ProvisionedAt time.Time `json:"provisioned_at,omitzero"`
	StateProblem  string    `json:"state_problem,omitempty"`
	// StoreError: the running agent uses an assignment it could not store (see
	// device.Status); the assignment shown is then the agent's.
	StoreError string `json:"store_error,omitempty"`

	ServiceRunning bool         `json:"service_running"`
	Phase          device.Phase `json:"phase"`
	Message        string       `json:"message,omitempty"`
	LastError      string       `json:"last_error"`
	NextRetry      time.Time    `json:"next_retry,omitzero"`
	StatusAt       time.Time    `json:"status_at,omitzero"`
	// Problems are what `unicity run` refuses to start with (device.HostChecks).
	Problems []string `json:"problems,omitempty"`
	// Telemetry is the running agent's telemetry queue.
	Telemetry *device.TelemetryStatus `json:"telemetry,omitempty"`
	// Renewal is the agent's renewal of the operational certificate, as its status says it
	// (the operational entry of Certificates has it with the stored certificate's).
	Renewal *device.RenewalStatus `json:"renewal,omitempty"`
}

// statusTimeout bounds the question to the service: a wedged agent must not wedge status.
const statusTimeout = 3 * time.Second

// runStatus reports identity, assignment and service state. It works with the service down
// (from the state and status files) and never needs the TPM for a PEM certificate.
func runStatus(ctx context.Context, e *env, args []string) error {
	flags := newFlagSet(e, "status", "[--config FILE] [--json]")
	var tf tpmFlags
	tf.register(flags)
	out := e.jsonFlag(flags, "print one JSON object")
	if err := parseFlags(flags, args); err != nil {
		return err
	}
	cfg, err := tf.loadConfig(flags, false)
	if err != nil {
		return err
	}
	r := statusReport{Attestation: cfg.Attestation.Method}

	// binding is what the stored assignment must be bound to, when known.
	var binding string
	switch cfg.Attestation.Method {
	case "tpm":
		r.RegistrationID, r.SRKHandle, r.IdentityKey = cfg.Provisioning.RegistrationID, cfg.Attestation.SRKHandle, cfg.Attestation.IdentityKey
	case "symmetric_key":
		r.RegistrationID = cfg.Provisioning.RegistrationID
		// The key file is the service user's alone: a technician without access sees the
		// assignment, unchecked, and why.
		creds, err := device.OpenCredentials(ctx, cfg)
		if err != nil {
			r.IdentityError = err.Error()
		} else {
			binding = creds.StateBinding()
			creds.Close()
		}
	default:
		tpm := tf.opener(ctx, cfg)
		chain, err := tpm.LoadChain(cfg.Attestation.IdentityCert)
		tpm.Close()
		if err != nil {
			r.IdentityError = err.Error()
		} else {
			leaf := chain[0]
			r.RegistrationID, r.SHA256Thumbprint, r.NotAfter = leaf.Subject.CommonName, certcodec.Thumbprint(leaf), leaf.NotAfter
			binding = r.SHA256Thumbprint
			if cfg.Certificates.Issued() {
				r.Certificates = append(r.Certificates, device.DescribeCertificate("onboarding", leaf, cfg.Attestation.IdentityKey, now()))
			}
		}
	}

	st, err := storage.New(cfg.State.Dir).Load()
	// stored is the state of the assignment shown, whose operational certificate is shown
	// once the running agent's renewal schedule is known.
	var stored *storage.State
	switch {
	case errors.Is(err, storage.ErrNotExist):
		r.StateProblem = "not provisioned yet"
	case errors.Is(err, fs.ErrPermission):
		r.StateProblem = err.Error() + " (only this command cannot read it: run it as root to see the assignment)"
	case errors.Is(err, storage.ErrCorrupt):
		r.StateProblem = err.Error() + " (the agent will set it aside and register again)"
	case err != nil:
		r.StateProblem = err.Error()
	case binding != "" && !st.BelongsTo(r.RegistrationID, binding) && !device.RollPending(st, r.RegistrationID):
		r.StateProblem = fmt.Sprintf("the stored assignment belongs to another identity (%s); the agent will register again", st.RegistrationID)
	default:
		r.AssignedHub, r.DeviceID, r.Substatus, r.ProvisionedAt = st.AssignedHub, st.DeviceID, st.Substatus, st.ProvisionedAt
		stored = st
		if binding != "" && !st.BelongsTo(r.RegistrationID, binding) {
			r.StateProblem = fmt.Sprintf("bound to the onboarding certificate before this one (%s): it stays in force until DPS accepts the new one", st.Binding)
		}
		if ek, ok := strings.CutPrefix(st.Binding, "tpm:"); ok && r.Attestation == "tpm" {
			r.EndorsementKeySHA256 = strings.ToLower(ek)
			if r.RegistrationID == "" {
				r.RegistrationID = st.RegistrationID
			}
		}
	}

	qctx, cancel := context.WithTimeout(ctx, statusTimeout)
	defer cancel()
	live, err := localapi.NewClient(cfg).Status(qctx)
	switch {
	case err == nil:
		r.ServiceRunning = true
		r.Phase = live.Phase
	case errors.Is(err, localapi.ErrNotRunning):
		r.Phase = "not_running"
		live, err = device.ReadStatus(cfg.Runtime.Dir)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			r.Message = err.Error()
		}
	default:
		// The service may run but not answer us (socket permissions, or wedged): say so,
		// and show what it last wrote.
		r.Phase = "unknown"
		r.Message = "cannot ask the service: " + err.Error()
		if s, err := device.ReadStatus(cfg.Runtime.Dir); err == nil {
			r.Phase, r.ServiceRunning = s.Phase, s.Phase != device.PhaseStopped
			live = s
		}
	}
	if live != nil {
		r.Message, r.LastError, r.NextRetry, r.StatusAt = live.Message, live.LastError, live.NextRetry, live.UpdatedAt
		r.Telemetry = live.Telemetry
		r.Credential = live.Credential
		r.Renewal = live.Renewal
		r.Onboarding = live.Onboarding
	}
	if live != nil && r.ServiceRunning && live.AssignedHub != "" && (live.StoreError != "" || r.AssignedHub == "") {
		// The assignment in force is the agent's: not stored, or not readable by this user.
		r.AssignedHub, r.DeviceID, r.StoreError = live.AssignedHub, live.DeviceID, live.StoreError
		if live.StoreError != "" {
			r.Substatus, r.ProvisionedAt = "", time.Time{}
		}
	}
	if stored != nil {
		running := live
		if !r.ServiceRunning {
			running = nil
		}
		if op, err := describeOperational(cfg, stored, running); err != nil {
			r.StateProblem = err.Error()
		} else if op != nil && cfg.Certificates.Issued() {
			r.Certificates = append(r.Certificates, *op)
		}
	}
	for _, hc := range cfg.HostChecks(config.AnyOwner) {
		if _, err := hc.Check(); err != nil {
			r.Problems = append(r.Problems, err.Error())
		}
	}

	if out.on {
		return out.print(r)
	}
	printStatus(e.stdout, r)
	return nil
}

func printStatus(w io.Writer, r statusReport) {
	fmt.Fprintln(w, "Identity")
	if r.Attestation == "tpm" {
		fmt.Fprintf(w, "  registration ID:  %s\n", cmp.Or(r.RegistrationID, "the EK's (see `unicity identity`)"))
		fmt.Fprintf(w, "  attestation:      TPM (endorsement key)\n")
		if r.EndorsementKeySHA256 != "" {
			fmt.Fprintf(w, "  EK SHA-256:       %s\n", r.EndorsementKeySHA256)
		}
		fmt.Fprintf(w, "  SRK:              %s\n", r.SRKHandle)
		imported := "not imported yet (registration imports it)"
		if r.AssignedHub != "" {
			imported = "imported at registration"
		}
		fmt.Fprintf(w, "  identity key:     %s (%s)\n", r.IdentityKey, imported)
	} else if r.Attestation == "symmetric_key" {
		fmt.Fprintf(w, "  registration ID:  %s\n", r.RegistrationID)
		fmt.Fprintf(w, "  attestation:      symmetric key (no certificate)\n")
		if r.IdentityError != "" {
			fmt.Fprintf(w, "  problem:          %s\n", r.IdentityError)
		}
	} else if r.IdentityError != "" {
		fmt.Fprintf(w, "  problem:          %s\n", r.IdentityError)
	} else {
		fmt.Fprintf(w, "  registration ID:  %s\n", r.RegistrationID)
		fmt.Fprintf(w, "  SHA-256:          %s\n", r.SHA256Thumbprint)
		fmt.Fprintf(w, "  expires:          %s\n", r.NotAfter.UTC().Format(time.RFC3339))
	}
	for _, c := range r.Certificates {
		printCertificate(w, c)
	}
	fmt.Fprintln(w, "Assignment")
	if r.AssignedHub == "" {
		fmt.Fprintf(w, "  none:             %s\n", r.StateProblem)
	} else {
		fmt.Fprintf(w, "  hub:              %s\n", r.AssignedHub)
		fmt.Fprintf(w, "  device ID:        %s\n", r.DeviceID)
		if r.Substatus != "" {
			fmt.Fprintf(w, "  substatus:        %s\n", r.Substatus)
		}
		if !r.ProvisionedAt.IsZero() {
			fmt.Fprintf(w, "  since:            %s\n", r.ProvisionedAt.UTC().Format(time.RFC3339))
		}
		if r.StoreError != "" {
			fmt.Fprintf(w, "  not stored:       %s\n", r.StoreError)
		} else if r.StateProblem != "" {
			fmt.Fprintf(w, "  state file:       %s\n", r.StateProblem)
		}
	}
	fmt.Fprintln(w, "Service")
	if r.ServiceRunning || r.Phase != "not_running" {
		fmt.Fprintf(w, "  phase:            %s\n", r.Phase)
		fmt.Fprintf(w, "  status:           %s\n", r.Message)
		if r.Credential != "" {
			fmt.Fprintf(w, "  hub credential:   %s\n", r.Credential)
		}
		printOnboarding(w, r.Onboarding)
	} else {
		fmt.Fprintf(w, "  phase:            not running\n")
		if r.Message != "" {
			fmt.Fprintf(w, "  last status:      %s (%s)\n", r.Message, r.StatusAt.UTC().Format(time.RFC3339))
		}
	}
	if r.LastError != "" {
		fmt.Fprintf(w, "  last error:       %s\n", r.LastError)
	}
	if !r.NextRetry.IsZero() {
		fmt.Fprintf(w, "  next retry:       %s\n", r.NextRetry.UTC().Format(time.RFC3339))
	}
	for _, p := range r.Problems {
		fmt.Fprintf(w, "  problem:          %s\n", p)
	}
	if t := r.Telemetry; t != nil {
		fmt.Fprintln(w, "Telemetry queue")
		if t.Problem != "" {
			fmt.Fprintf(w, "  not open:         %s\n", t.Problem)
			return
		}
		fmt.Fprintf(w, "  queued:           %d messages (%d sent, awaiting the hub), %s of %s\n", t.Messages, t.InFlight, sizeOf(t.Bytes), sizeOf(t.MaxBytes))
		if t.Messages > 0 {
			fmt.Fprintf(w, "  oldest:           %s ago\n", time.Duration(t.OldestAgeSeconds)*time.Second)
		}
		fmt.Fprintf(w, "  when full:        %s\n", t.WhenFull)
		fmt.Fprintf(w, "  removed unsent:   %d dropped, %d expired, %d rejected by the hub\n", t.Dropped, t.Expired, t.Rejected)
		if t.Torn > 0 {
			fmt.Fprintf(w, "  torn records:     %d dropped at start (a crash or power cut mid-write)\n", t.Torn)
		}
	}
}

// printOnboarding shows the running agent's trouble with the onboarding certificate.
func printOnboarding(w io.Writer, o *device.OnboardingStatus) {
	if o == nil {
		return
	}
	if c := o.Expired; c != nil {
		fmt.Fprintf(w, "  onboarding:       EXPIRED: %s (serial %s, SHA-256 %s) expired at %s; DPS cannot be reached until a new one is installed (`unicity factory install`, then `systemctl reload unicity`)\n",
			c.Subject, c.Serial, c.SHA256Thumbprint, c.NotAfter.UTC().Format(time.RFC3339))
	}
	if roll := o.Roll; roll != nil {
		fmt.Fprintf(w, "  certificate roll: pending: %s stays in force until DPS accepts %s\n", roll.From, roll.To)
		if roll.Reason != "" {
			fmt.Fprintf(w, "  roll refused:     %s; next try at %s, or `systemctl reload unicity`\n", roll.Reason, roll.NextTry.UTC().Format(time.RFC3339))
		}
	}
}

// printCertificate shows one credential's certificate (status, identity).
func printCertificate(w io.Writer, c device.CertificateInfo) {
	fmt.Fprintf(w, "%s certificate\n", titleCase(c.Role))
	fmt.Fprintf(w, "  subject:          %s\n", c.Subject)
	fmt.Fprintf(w, "  issuer:           %s\n", c.Issuer)
	fmt.Fprintf(w, "  serial:           %s\n", c.Serial)
	fmt.Fprintf(w, "  SHA-256:          %s\n", c.SHA256Thumbprint)
	fmt.Fprintf(w, "  SHA-1:            %s\n", c.SHA1Thumbprint)
	fmt.Fprintf(w, "  valid:            %s to %s (%d days left)\n", c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339), c.DaysLeft)
	fmt.Fprintf(w, "  key:              %s\n", c.Key)
	if rn := c.Renewal; rn != nil {
		fmt.Fprintf(w, "  next renewal:     %s\n", nextRenewal(rn, now()))
		if l := rn.Last; l != nil {
			fmt.Fprintf(w, "  last renewal:     %s\n", lastRenewal(l))
		}
		if p := rn.Pending; p != nil {
			fmt.Fprintf(w, "  on trial:         %s\n", pendingRenewal(p))
		}
	}
}

// describeOperational is st's operational certificate with its renewal, nil when st holds
// none; live is the running agent's status, nil when it does not run.
func describeOperational(cfg *config.Config, st *storage.State, live *device.Status) (*device.CertificateInfo, error) {
	op, err := device.StoredOperational(st, now())
	if err != nil || op == nil {
		return op, err
	}
	var schedule *device.RenewalStatus
	if live != nil {
		schedule = live.Renewal
	}
	op.Renewal, err = device.DescribeRenewal(cfg.Certificates, st, schedule)
	return op, err
}

// runningStatus is the running agent's status, nil when it does not run or does not answer.
func runningStatus(ctx context.Context, cfg *config.Config) *device.Status {
	ctx, cancel := context.WithTimeout(ctx, statusTimeout)
	defer cancel()
	s, err := localapi.NewClient(cfg).Status(ctx)
	if err != nil {
		return nil
	}
	return s
}

// nextRenewal says when the operational certificate is renewed, and how far the running
// agent has got with it.
func nextRenewal(rn *device.RenewalInfo, t time.Time) string {
	at := rn.NextAt.UTC().Format(time.RFC3339)
	switch rn.State {
	case device.RenewalScheduled:
		return at + " (scheduled)"
	case device.RenewalRequesting:
		return "under way: asking " + device.PathName(rn.Via) + " for a new certificate"
	case device.RenewalVerifying:
		return "under way: connecting to the hub with the new certificate"
	case device.RenewalRetrying:
		return fmt.Sprintf("%s (retrying through %s after %d failed attempt(s))", at, device.PathName(rn.Via), rn.Failures)
	case "":
		if !t.Before(rn.NextAt) {
			return at + " (due: the agent renews it as soon as it runs)"
		}
		return at
	}
	return at + " (" + rn.State + ")"
}

// lastRenewal says how the latest renewal ended.
func lastRenewal(l *storage.RenewalResult) string {
	at := l.At.UTC().Format(time.RFC3339)
	if l.Result == storage.Renewed {
		return fmt.Sprintf("renewed through %s at %s: %s", device.PathName(l.Via), at, l.Thumbprint)
	}
	return fmt.Sprintf("%s through %s at %s: %s", l.Result, device.PathName(l.Via), at, l.Error)
}

// pendingRenewal describes a renewed certificate on trial.
func pendingRenewal(p *device.PendingRenewal) string {
	return fmt.Sprintf("renewed certificate %s waiting for the hub to accept it (issued through %s at %s, valid until %s)",
		p.SHA256Thumbprint, device.PathName(p.Via), p.IssuedAt.UTC().Format(time.RFC3339), p.NotAfter.UTC().Format(time.RFC3339))
}

// titleCase capitalizes a role name for a heading.
func titleCase(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// sizeOf is n bytes in KiB or MiB.
func sizeOf(n int64) string {
	if n >= 1<<20 {
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
}
