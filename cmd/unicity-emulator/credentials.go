package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub/hubtest"
)

// Certificate management: credential policies on enrollments (DPS issues operational
// certificates), revocation of a device's operational certificates on its hub, and faults
// of the hubs' renewal endpoint.

// policiesFile keeps the credential policies set with 'policy', applied again by serve.
const policiesFile = "policies.json"

// policyJSON is a credential policy on the admin socket and in policiesFile.
type policyJSON struct {
	Name            string   `json:"name"`
	ValiditySeconds int64    `json:"validity_seconds"`
	KeyTypes        []string `json:"key_types"`
}

// policyRequest links a policy to an enrollment, or unlinks it (Policy nil).
type policyRequest struct {
	Group          string      `json:"group,omitempty"`
	RegistrationID string      `json:"registration_id,omitempty"`
	Policy         *policyJSON `json:"credential_policy"`
}

func (r policyRequest) enrollment() enrollRequest {
	return enrollRequest{Group: r.Group, RegistrationID: r.RegistrationID}
}

func (p *policyJSON) credentialPolicy() *dpstest.CredentialPolicy {
	if p == nil {
		return nil
	}
	c := &dpstest.CredentialPolicy{Name: p.Name, Validity: time.Duration(p.ValiditySeconds) * time.Second}
	for _, k := range p.KeyTypes {
		c.KeyTypes = append(c.KeyTypes, dpstest.KeyType(k))
	}
	return c
}

type policiesDoc struct {
	Version  int             `json:"version"`
	Policies []policyRequest `json:"policies"`
}

// policies is the policies file, loaded.
type policies struct {
	path string
	mu   sync.Mutex
	list []policyRequest
}

func loadPolicies(path string) (*policies, error) {
	var doc policiesDoc
	if err := readDoc(path, &doc, &doc.Version); err != nil {
		return nil, err
	}
	return &policies{path: path, list: doc.Policies}, nil
}

// applyAll links every saved policy; one whose enrollment is gone went with it.
func (p *policies) applyAll(dps *dpstest.Server) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, req := range p.list {
		if err := applyPolicy(dps, req); err != nil && !errors.Is(err, dpstest.ErrNotFound) {
			return fmt.Errorf("%s: %w", p.path, err)
		}
	}
	return nil
}

// reapply links the saved policy of an enrollment again, after 'enroll' replaced it.
func (p *policies) reapply(dps *dpstest.Server, enrollment enrollRequest) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, req := range p.list {
		if req.enrollment().key() == enrollment.key() {
			return applyPolicy(dps, req)
		}
	}
	return nil
}

func applyPolicy(dps *dpstest.Server, req policyRequest) error {
	id := req.Group + req.RegistrationID
	return dps.SetCredentialPolicy(id, req.Policy.credentialPolicy())
}

// set links or unlinks a policy and saves the change.
func (p *policies) set(dps *dpstest.Server, req policyRequest) error {
	if err := applyPolicy(dps, req); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	list := slices.DeleteFunc(slices.Clone(p.list), func(old policyRequest) bool {
		return old.enrollment().key() == req.enrollment().key()
	})
	if req.Policy != nil {
		list = append(list, req)
	}
	if err := writeDoc(p.path, policiesDoc{Version: configVersion, Policies: list}); err != nil {
		return fmt.Errorf("cannot save the policy: %w", err)
	}
	p.list = list
	return nil
}

type revokeRequest struct {
	Device     string `json:"device"`
	Thumbprint string `json:"thumbprint,omitempty"`
}

// renewalFaultRequest scripts the hubs' issueCertificate answers; Fault nil restores them.
type renewalFaultRequest struct {
	Fault *renewalFaultJSON `json:"fault"`
	// Times is how many requests the fault answers; 0 is every one until cleared.
	Times int `json:"times"`
}

type renewalFaultJSON struct {
	ErrorCode         int     `json:"error_code,omitempty"`
	RetryAfterSeconds int     `json:"retry_after_seconds,omitempty"`
	Accepted          bool    `json:"accepted,omitempty"`
	Silent            bool    `json:"silent,omitempty"`
	Drop              bool    `json:"drop,omitempty"`
	Unsynced          bool    `json:"unsynced,omitempty"`
	DelaySeconds      float64 `json:"delay_seconds,omitempty"`
}

func (f *renewalFaultJSON) issueFault() hubtest.IssueFault {
	if f == nil {
		return hubtest.IssueFault{}
	}
	return hubtest.IssueFault{Status: f.ErrorCode / 1000, ErrorCode: f.ErrorCode,
		RetryAfter: time.Duration(f.RetryAfterSeconds) * time.Second, Accepted: f.Accepted,
		Silent: f.Silent, Drop: f.Drop, Unsynced: f.Unsynced, Delay: time.Duration(f.DelaySeconds * float64(time.Second))}
}

func (a *admin) policy(w http.ResponseWriter, r *http.Request) {
	var req policyRequest
	if !decode(w, r, &req) {
		return
	}
	reply(w, map[string]any{"enrollment": req.Group + req.RegistrationID, "group": req.Group != "",
		"credential_policy": req.Policy}, a.policies.set(a.dps, req))
}

func (a *admin) revoke(w http.ResponseWriter, r *http.Request) {
	var req revokeRequest
	if !decode(w, r, &req) {
		return
	}
	h, ok := a.hubOf(w, req.Device)
	if !ok {
		return
	}
	revoked, err := h.Revoke(req.Device, req.Thumbprint)
	reply(w, map[string]any{"device_id": req.Device, "hub": h.Name(), "revoked": revoked}, err)
}

func (a *admin) renewalFault(w http.ResponseWriter, r *http.Request) {
	var req renewalFaultRequest
	if !decode(w, r, &req) {
		return
	}
	for _, h := range a.fleet.Hubs() {
		h.FailIssue(req.Times, req.Fault.issueFault())
	}
	reply(w, map[string]any{"hubs": a.fleet.Names(), "fault": req.Fault, "times": req.Times}, nil)
}

func runPolicy(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("policy")
	group := fs.String("group", "", "the enrollment group `ID`")
	regID := fs.String("registration-id", "", "the individual enrollment's registration `ID`")
	name := fs.String("name", "default", "the policy's `name` (credentialPolicyName)")
	validity := fs.Duration("validity", dpstest.DefaultValidity, "lifetime of the certificates issued, a `duration` (Azure: 7 to 90 days; down to seconds here)")
	keyTypes := fs.String("key-types", "P-256,P-384", "CSR key `types` signed, comma-separated: P-256, P-384")
	unlink := fs.Bool("clear", false, "unlink the enrollment's policy: DPS assigns its devices and issues nothing")
	if err := parse(e, fs, "--dir DIR (--group ID | --registration-id ID) ([--name NAME] [--validity D] [--key-types P-256,P-384] | --clear)", args); err != nil {
		return err
	}
	if (*group == "") == (*regID == "") {
		return usageErrorf("policy: give exactly one of --group and --registration-id")
	}
	req := policyRequest{Group: *group, RegistrationID: *regID}
	if !*unlink {
		if *validity < time.Second {
			return usageErrorf("policy: --validity %v is under a second", *validity)
		}
		req.Policy = &policyJSON{Name: *name, ValiditySeconds: int64(*validity / time.Second), KeyTypes: strings.Split(*keyTypes, ",")}
		for _, k := range req.Policy.KeyTypes {
			if k != string(dpstest.KeyP256) && k != string(dpstest.KeyP384) {
				return usageErrorf("policy: --key-types: %q is not P-256 or P-384 (the service signs no RSA)", k)
			}
		}
	}
	var out json.RawMessage
	if err := newAdminClient(*dir).call(ctx, http.MethodPost, "/v1/policy", nil, req, &out); err != nil {
		return fmt.Errorf("policy: %w", err)
	}
	return printJSON(e.stdout, out)
}

func runRevoke(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("revoke")
	device := fs.String("device", "", "device `ID`")
	thumbprint := fs.String("thumbprint", "", "only the operational certificate with this SHA-256 `hex` (default: all of the device's)")
	if err := parse(e, fs, "--dir DIR --device ID [--thumbprint HEX]", args); err != nil {
		return err
	}
	if *device == "" {
		return usageErrorf("revoke: --device is required")
	}
	var out json.RawMessage
	if err := newAdminClient(*dir).call(ctx, http.MethodPost, "/v1/revoke", nil, revokeRequest{Device: *device, Thumbprint: *thumbprint}, &out); err != nil {
		return err
	}
	return printJSON(e.stdout, out)
}

func runRenewalFault(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("renewal-fault")
	code := fs.Int("error-code", 0, "answer with this error `code` (status: its first three digits), e.g. 400040 (permanent) or 503001 (transient)")
	retryAfter := fs.Int("retry-after", 0, "retryAfter `seconds` in the error answer")
	accepted := fs.Bool("accepted", false, "send 202 before the error, as a failure while signing would")
	silent := fs.Bool("silent", false, "send 202 and nothing after: the device times out")
	drop := fs.Bool("drop", false, "close the connection instead of answering")
	unsynced := fs.Bool("unsynced", false, "issue the certificate without the hub accepting it (credentials not synced yet)")
	delay := fs.Duration("delay", 0, "hold the final answer this `long` after the 202")
	times := fs.Int("times", 0, "how many requests the fault answers (`N`; 0: every one until --clear)")
	restore := fs.Bool("clear", false, "answer normally again")
	if err := parse(e, fs, "--dir DIR (--error-code N [--retry-after S] [--accepted] | --silent | --drop | --unsynced | --delay D) [--times N] | --clear", args); err != nil {
		return err
	}
	req := renewalFaultRequest{Times: *times}
	if !*restore {
		f := &renewalFaultJSON{ErrorCode: *code, RetryAfterSeconds: *retryAfter, Accepted: *accepted,
			Silent: *silent, Drop: *drop, Unsynced: *unsynced, DelaySeconds: delay.Seconds()}
		switch {
		case *code == 0 && !*silent && !*drop && !*unsynced && *delay == 0:
			return usageErrorf("renewal-fault: give --error-code, --silent, --drop, --unsynced, --delay or --clear")
		case *code != 0 && (*code < 400000 || *code > 599999):
			return usageErrorf("renewal-fault: --error-code %d is not a six-digit 4xx or 5xx code", *code)
		case *times < 0 || *retryAfter < 0 || *delay < 0:
			return usageErrorf("renewal-fault: --times, --retry-after and --delay cannot be negative")
		}
		req.Fault = f
	}
	var out json.RawMessage
	if err := newAdminClient(*dir).call(ctx, http.MethodPost, "/v1/renewal-fault", nil, req, &out); err != nil {
		return err
	}
	return printJSON(e.stdout, out)
}
