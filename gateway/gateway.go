// Package gateway relays between the agent's hub session and the gateway's applications:
// telemetry up (Submit, through the on-disk store of package telemetry), the twin, cloud-to-device messages (kept in a backlog while
// no application listens), desired properties and direct methods down to the applications'
// event streams; it reports the agent's health in the twin and answers the unicity.* direct
// methods itself. It speaks no HTTP: the local API (package localapi) serves it to the
// applications through its localapi.Gateway interface.
package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/version"
	"github.com/unicity-iot/unicity/localapi"
	"github.com/unicity-iot/unicity/storage"
	"github.com/unicity-iot/unicity/telemetry"
)

// ErrNoSession: no hub session is up to carry the request.
var ErrNoSession = errors.New("not connected to the hub")

// ReportedKey is the reported property under which the agent reports onboarding health;
// applications may not patch it.
const ReportedKey = "unicity"

// Direct methods the agent answers itself.
const (
	MethodReprovision = "unicity.reprovision"
	MethodStatus      = "unicity.status"
)

const (
	// c2dBacklog holds cloud-to-device messages while no application listens: the hub's own
	// limit of pending messages per device. Beyond it the hub's copy stays unacknowledged.
	c2dBacklog = 50
	// subscriberBuffer is how far an application's event stream may fall behind before the
	// agent closes it (the application reconnects; nothing is dropped behind its back).
	subscriberBuffer = 64
	reportTimeout    = time.Minute
	// reprovisionAnswer is how long unicity.reprovision waits for the registration's outcome:
	// under the service's default method response timeout of 30 s.
	reprovisionAnswer = 20 * time.Second
)

// Agent is what the gateway asks of the agent (device.Agent).
type Agent interface {
	Status() device.Status
	Subscribe() (updates <-chan device.Status, cancel func())
	Register(ctx context.Context, r device.Request) (*storage.State, error)
	// Assignment is the assignment in force, nil before the first.
	Assignment() *storage.State
	NoteError(err error)
}

// Gateway is the connected agent's side towards the cloud and the gateway's applications:
// it reports the agent's health in the twin, answers the unicity.* direct methods, and
// relays telemetry, the twin, cloud-to-device messages, desired properties and direct
// methods between the hub session and the applications on the local API (it is the
// localapi.Gateway the local API's routes use).
type Gateway struct {
	Agent Agent
	Hubs  *device.HubSessions
	// Clock dates and ages the telemetry store's messages; nil means the system clock.
	Clock device.Clock

	reportNow chan struct{}

	mu       sync.Mutex
	ctx      context.Context // the agent's, once run has started (for unicity.reprovision)
	subs     map[*subscriber]struct{}
	backlog  []hub.Message
	space    chan struct{} // closed and replaced when the backlog shrinks or a subscriber comes
	calls    map[string]*pendingCall
	nextCall uint64
	hubState hub.State
	// validFrom and notAfter are those of the certificate the session presents: the
	// operational one when DPS issued it, else the identity certificate.
	validFrom, notAfter time.Time
	// reported is what the twin last got of the credentials' lifecycle (lifecycleKey): its
	// changes are reported as they come, not only with the next connection.
	reported string

	store        *telemetry.Store // nil until open
	storeProblem error            // why store is nil
}

type pendingCall struct {
	answer chan hub.MethodResponse
	sub    *subscriber
}

// New attaches a gateway to the agent's hub sessions; run it (Run) as one of the agent's
// Services.
func New(a Agent, hubs *device.HubSessions) *Gateway {
	g := &Gateway{
		Agent:     a,
		Hubs:      hubs,
		reportNow: make(chan struct{}, 1),
		subs:      map[*subscriber]struct{}{},
		space:     make(chan struct{}),
		calls:     map[string]*pendingCall{},
	}
	prev := hubs.Configure
	hubs.Configure = func(hc *hub.Config) {
		if prev != nil {
			prev(hc)
		}
		g.configure(hc)
	}
	return g
}

// configure routes a new session's traffic through the gateway.
func (g *Gateway) configure(hc *hub.Config) {
	if cert := hc.Dial.Certificate; cert != nil && cert.Leaf != nil {
		g.mu.Lock()
		g.validFrom, g.notAfter = cert.Leaf.NotBefore, cert.Leaf.NotAfter
		g.mu.Unlock()
	}
	hc.OnMessage = g.onMessage
	hc.OnDesired = g.onDesired
	hc.OnMethod = g.onMethod
	onState := hc.OnState
	hc.OnState = func(s hub.State) {
		g.mu.Lock()
		g.hubState = s
		g.mu.Unlock()
		if s.Connected {
			// Every connection reports: the twin then shows the transport in use and the
			// error that ended the previous connection.
			select {
			case g.reportNow <- struct{}{}:
			default:
			}
		}
		if onState != nil {
			onState(s)
		}
	}
}

// Run forwards the applications' telemetry and reports the agent's health whenever a
// connection comes up, until ctx ends; it returns once the telemetry store is closed.
func (g *Gateway) Run(ctx context.Context) {
	g.mu.Lock()
	g.ctx = ctx
	g.mu.Unlock()
	forwarding := make(chan struct{})
	go func() {
		defer close(forwarding)
		g.runTelemetry(ctx)
	}()
	defer func() { <-forwarding }()
	updates, cancel := g.Agent.Subscribe()
	defer cancel()
	pending := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.reportNow:
			pending = true
		case <-updates:
			// The session becomes the agent's current one a moment after it connects; the
			// renewal of the operational certificate and the onboarding certificate's trouble
			// are reported step by step.
			st := g.Agent.Status()
			key := lifecycleKey(renewalHealth(st.Renewal), onboardingHealth(st.Onboarding))
			g.mu.Lock()
			changed := key != g.reported
			g.mu.Unlock()
			pending = pending || changed
		}
		if pending && g.report(ctx) == nil {
			pending = false
		}
	}
}

// Health is what the agent reports under ReportedKey.
type Health struct {
	AgentVersion        string    `json:"agent_version"`
	RegistrationID      string    `json:"registration_id"`
	DeviceID            string    `json:"device_id"`
	ProvisionedAt       time.Time `json:"provisioned_at,omitzero"`
	Substatus           string    `json:"substatus,omitempty"`
	Transport           string    `json:"transport,omitempty"`
	CertificateNotAfter time.Time `json:"certificate_not_after,omitzero"`
	// ValidFrom and ValidUntil are the validity of the certificate the hub is reached with,
	// as Azure's certificate management recommends reporting it; Credential says which one
	// it is (device.CredentialState).
	ValidFrom            time.Time              `json:"validFrom,omitzero"`
	ValidUntil           time.Time              `json:"validUntil,omitzero"`
	Credential           device.CredentialState `json:"credential,omitempty"`
	ProvisioningAttempts int                    `json:"provisioning_attempts,omitempty"`
	ProvisioningMillis   int64                  `json:"provisioning_duration_ms"`
	ConnectedAt          time.Time              `json:"connected_at,omitzero"`
	// LastError is null when there is none, which removes an old one from the twin.
	LastError   *string    `json:"last_error"`
	LastErrorAt *time.Time `json:"last_error_at"`
	// Telemetry is the on-disk queue as the connection came up: what waited while offline.
	Telemetry *device.TelemetryStatus `json:"telemetry"`
	// Renewal is where the renewal of the operational certificate stands; null without
	// one, which removes an old one from the twin.
	Renewal *RenewalHealth `json:"renewal"`
	// Onboarding is the factory certificate's trouble: expired, or a roll to a new one DPS
	// has not accepted yet; null when it has none.
	Onboarding *OnboardingHealth `json:"onboarding"`
}

// OnboardingHealth is device.OnboardingStatus in the twin, every field present (see
// RenewalHealth).
type OnboardingHealth struct {
	Expired *device.CertificateInfo `json:"expired"`
	Roll    *device.RollStatus      `json:"roll"`
}

func onboardingHealth(s *device.OnboardingStatus) *OnboardingHealth {
	if s == nil {
		return nil
	}
	return &OnboardingHealth{Expired: s.Expired, Roll: s.Roll}
}

// RenewalHealth is device.RenewalStatus in the twin. A reported patch leaves the fields it
// omits as they were, so every field is always present, null when unknown: a renewal that
// succeeds after one that failed leaves no stale error.
type RenewalHealth struct {
	State    string          `json:"state"`
	NextAt   *time.Time      `json:"next_at"`
	Via      string          `json:"via"`
	Failures int             `json:"failures"`
	Last     *RenewalOutcome `json:"last"`
}

// RenewalOutcome is how the latest renewal ended (storage.RenewalResult), every field present.
type RenewalOutcome struct {
	At         time.Time `json:"at"`
	Result     string    `json:"result"`
	Via        string    `json:"via"`
	Thumbprint *string   `json:"sha256_thumbprint"`
	Error      *string   `json:"error"`
}

// renewalHealth is s in the twin, nil without one.
func renewalHealth(s *device.RenewalStatus) *RenewalHealth {
	if s == nil {
		return nil
	}
	h := &RenewalHealth{State: s.State, Via: s.Via, Failures: s.Failures}
	if !s.NextAt.IsZero() {
		h.NextAt = &s.NextAt
	}
	if l := s.Last; l != nil {
		h.Last = &RenewalOutcome{At: l.At, Result: l.Result, Via: l.Via, Thumbprint: nonEmpty(l.Thumbprint), Error: nonEmpty(l.Error)}
	}
	return h
}

func nonEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// lifecycleKey tells apart the states of the credentials' lifecycle, as the twin gets them.
func lifecycleKey(r *RenewalHealth, o *OnboardingHealth) string {
	b, _ := json.Marshal([]any{r, o})
	return string(b)
}

// health gathers the report from the agent's status, the assignment in force and the session.
func (g *Gateway) health() Health {
	status := g.Agent.Status()
	g.mu.Lock()
	hs, validFrom, notAfter := g.hubState, g.validFrom, g.notAfter
	g.mu.Unlock()
	h := Health{
		AgentVersion:        version.Version,
		RegistrationID:      status.RegistrationID,
		DeviceID:            status.DeviceID,
		Transport:           hs.Transport,
		ConnectedAt:         hs.Since,
		CertificateNotAfter: notAfter,
		ValidFrom:           validFrom,
		ValidUntil:          notAfter,
		Credential:          status.Credential,
		Telemetry:           g.TelemetryStatus(),
		Renewal:             renewalHealth(status.Renewal),
		Onboarding:          onboardingHealth(status.Onboarding),
	}
	if st := g.Agent.Assignment(); st != nil {
		h.ProvisionedAt, h.Substatus = st.ProvisionedAt, st.Substatus
		h.ProvisioningAttempts, h.ProvisioningMillis = st.Attempts, st.Duration.Milliseconds()
	}
	if status.LastError != "" {
		h.LastError, h.LastErrorAt = &status.LastError, &status.LastErrorAt
	}
	return h
}

func (g *Gateway) report(ctx context.Context) error {
	c := g.Hubs.Client()
	if c == nil || !c.State().Connected {
		return ErrNoSession
	}
	h := g.health()
	patch, err := json.Marshal(map[string]Health{ReportedKey: h})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, reportTimeout)
	defer cancel()
	if _, err = c.UpdateReported(ctx, patch); err != nil {
		return err
	}
	g.mu.Lock()
	g.reported = lifecycleKey(h.Renewal, h.Onboarding)
	g.mu.Unlock()
	return nil
}

// onMessage hands a cloud-to-device message to every listening application, or keeps it
// until one listens. With the backlog full it waits for room; if the session ends first the
// hub's copy stays pending and comes again on the next connection.
func (g *Gateway) onMessage(ctx context.Context, m hub.Message) bool {
	for {
		g.mu.Lock()
		if g.broadcast(eventOf(m), func(s *subscriber) bool { return s.c2d }) {
			g.mu.Unlock()
			return true
		}
		if len(g.backlog) < c2dBacklog {
			g.backlog = append(g.backlog, m)
			g.mu.Unlock()
			return true
		}
		space := g.space
		g.mu.Unlock()
		select {
		case <-space:
		case <-ctx.Done():
			return false
		}
	}
}

func (g *Gateway) onDesired(d hub.Desired) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.broadcast(localapi.Event{Type: "desired", Version: d.Version, Full: d.Full, Desired: d.Properties},
		func(s *subscriber) bool { return s.desired })
}

// broadcast sends e to the subscribers that want it and reports whether any took it. A
// subscriber too slow to take it is closed. g.mu must be held.
func (g *Gateway) broadcast(e localapi.Event, wants func(*subscriber) bool) bool {
	taken := false
	for s := range g.subs {
		if !wants(s) {
			continue
		}
		if s.send(e) {
			taken = true
		} else {
			g.dropLocked(s)
		}
	}
	return taken
}

// onMethod answers the agent's own methods and relays the rest to the application that
// registered them.
func (g *Gateway) onMethod(ctx context.Context, call hub.MethodCall) hub.MethodResponse {
	switch call.Name {
	case MethodStatus:
		return jsonResponse(200, struct {
			Status device.Status `json:"status"`
			Health Health        `json:"health"`
		}{g.Agent.Status(), g.health()})
	case MethodReprovision:
		return g.reprovision(ctx, call)
	}
	g.mu.Lock()
	var owner *subscriber
	for s := range g.subs {
		if s.serves(call.Name) && (owner == nil || s.since.After(owner.since)) {
			owner = s
		}
	}
	if owner == nil {
		g.mu.Unlock()
		return jsonResponse(404, map[string]string{"message": "no application on this gateway serves method " + call.Name})
	}
	g.nextCall++
	id := strconv.FormatUint(g.nextCall, 10)
	pc := &pendingCall{answer: make(chan hub.MethodResponse, 1), sub: owner}
	g.calls[id] = pc
	ok := owner.send(localapi.Event{Type: "method", ID: id, Name: call.Name, Payload: call.Payload})
	if !ok {
		g.dropLocked(owner)
	}
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		delete(g.calls, id)
		g.mu.Unlock()
	}()
	if !ok {
		return jsonResponse(503, map[string]string{"message": "the application serving " + call.Name + " is not keeping up"})
	}
	select {
	case r := <-pc.answer:
		return r
	case <-owner.done:
		return jsonResponse(503, map[string]string{"message": "the application serving " + call.Name + " went away"})
	case <-ctx.Done():
		return jsonResponse(504, map[string]string{"message": "the application serving " + call.Name + " did not answer in time"})
	}
}

// Answer delivers an application's response to method call id; false if no call waits.
func (g *Gateway) Answer(id string, r hub.MethodResponse) bool {
	g.mu.Lock()
	pc := g.calls[id]
	delete(g.calls, id)
	g.mu.Unlock()
	if pc == nil {
		return false
	}
	pc.answer <- r
	return true
}

// reprovision asks the agent loop for a registration and answers with its outcome: 200 with
// the new assignment (the session this answer travels on then ends, and the device connects
// where DPS sent it), or the reason it failed. A registration still running when
// reprovisionAnswer has passed is answered 202, its outcome shown in the reported
// properties under ReportedKey.
func (g *Gateway) reprovision(ctx context.Context, call hub.MethodCall) hub.MethodResponse {
	var args struct {
		Force bool `json:"force"`
	}
	if len(call.Payload) > 0 && string(call.Payload) != "null" {
		if err := json.Unmarshal(call.Payload, &args); err != nil {
			return jsonResponse(400, map[string]string{"message": "payload: want {\"force\": true|false}"})
		}
	}
	g.mu.Lock()
	agentCtx := g.ctx
	g.mu.Unlock()
	if agentCtx == nil {
		return jsonResponse(503, map[string]string{"message": "the agent is not ready"})
	}
	type result struct {
		state *storage.State
		err   error
	}
	done := make(chan result, 1)
	go func() {
		st, err := g.Agent.Register(agentCtx, device.Request{Force: args.Force})
		if err != nil && agentCtx.Err() == nil {
			g.Agent.NoteError(fmt.Errorf("%s: %w", MethodReprovision, err))
		}
		done <- result{st, err}
	}()
	t := time.NewTimer(reprovisionAnswer)
	defer t.Stop()
	var r result
	answered := false
	select {
	case r = <-done:
		answered = true
	case <-t.C:
	case <-ctx.Done():
		// The session ends once the new assignment is stored, just after the agent replied:
		// the reply is on its way (the session waits for this answer before it disconnects).
		grace := time.NewTimer(time.Second)
		defer grace.Stop()
		select {
		case r = <-done:
			answered = true
		case <-grace.C:
		}
	}
	switch {
	case answered && r.err != nil:
		return jsonResponse(localapi.RegistrationStatus(r.err), map[string]string{"message": r.err.Error()})
	case answered:
		return jsonResponse(200, map[string]localapi.Assignment{"assignment": localapi.AssignmentOf(r.state)})
	}
	return jsonResponse(202, map[string]string{"message": "registering again with DPS; the device reconnects once the new assignment is in force"})
}

func jsonResponse(status int, v any) hub.MethodResponse {
	b, _ := json.Marshal(v)
	return hub.MethodResponse{Status: status, Payload: b}
}
