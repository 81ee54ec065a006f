package device

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/unicity-iot/unicity/hub"
)

// The local API's routes for gateway applications (see the README, "Local API"):
//
//	POST  /v1/telemetry                 send a telemetry message through the hub session
//	GET   /v1/twin                      the device twin
//	PATCH /v1/twin/reported             patch reported properties (not the agent's own key)
//	GET   /v1/events?c2d=1&desired=1&method=NAME...
//	                                    stream of cloud-to-device messages, desired-property
//	                                    updates and calls of the methods registered, as JSON lines
//	POST  /v1/methods/{id}/response     answer a method call received on the stream

// Request body limits: the hub's own limits with room for JSON and base64.
const (
	maxTelemetryBody = 512 << 10
	maxPatchBody     = 64 << 10
	maxResponseBody  = 256 << 10

	defaultSendWait = 30 * time.Second
	maxSendWait     = 5 * time.Minute
	hubCallTimeout  = time.Minute
)

func (g *Gateway) routes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/telemetry", g.handleTelemetry)
	mux.HandleFunc("GET /v1/twin", g.handleTwin)
	mux.HandleFunc("PATCH /v1/twin/reported", g.handlePatchReported)
	mux.HandleFunc("GET /v1/events", g.handleEvents)
	mux.HandleFunc("POST /v1/methods/{id}/response", g.handleMethodResponse)
}

// TelemetryRequest is the body of POST /v1/telemetry. The payload is either a JSON value,
// sent as its JSON text, or arbitrary bytes in base64; Properties holds application
// properties and, under their "$." names ("$.ct", "$.ce", "$.mid", …), system properties.
type TelemetryRequest struct {
	Payload       json.RawMessage   `json:"payload,omitempty"`
	PayloadBase64 []byte            `json:"payload_base64,omitempty"`
	Properties    map[string]string `json:"properties,omitempty"`
}

// Event is one line of the GET /v1/events stream.
type Event struct {
	// Type is "subscribed" (first line), "c2d", "desired" or "method".
	Type string `json:"type"`
	// c2d: the message; Payload is set too when the bytes are JSON.
	PayloadBase64 []byte            `json:"payload_base64,omitempty"`
	Properties    map[string]string `json:"properties,omitempty"`
	// desired: the patch, or with Full the whole desired section (after a reconnect).
	Version int64           `json:"version,omitempty"`
	Full    bool            `json:"full,omitempty"`
	Desired json.RawMessage `json:"desired,omitempty"`
	// method: answer with POST /v1/methods/{ID}/response.
	ID      string          `json:"id,omitempty"`
	Name    string          `json:"name,omitempty"`
	Payload json.RawMessage `json:"payload,omitempty"`
	// subscribed: the methods this stream serves.
	Methods []string `json:"methods,omitempty"`
}

// MethodAnswer is the body of POST /v1/methods/{id}/response.
type MethodAnswer struct {
	Status  *int            `json:"status"`
	Payload json.RawMessage `json:"payload,omitempty"`
}

func eventOf(m hub.Message) Event {
	e := Event{Type: "c2d", PayloadBase64: m.Payload, Properties: m.Properties}
	if len(m.Payload) > 0 && json.Valid(m.Payload) {
		e.Payload = m.Payload
	}
	return e
}

// subscriber is one application's event stream.
type subscriber struct {
	c2d, desired bool
	methods      []string
	since        time.Time
	events       chan Event
	done         chan struct{} // closed when the stream is dropped
	closeOnce    sync.Once
}

func (s *subscriber) send(e Event) bool {
	select {
	case s.events <- e:
		return true
	default:
		return false
	}
}

func (s *subscriber) serves(name string) bool { return slices.Contains(s.methods, name) }

// dropLocked ends a subscriber's stream; g.mu must be held.
func (g *Gateway) dropLocked(s *subscriber) {
	delete(g.subs, s)
	s.closeOnce.Do(func() { close(s.done) })
}

func (g *Gateway) handleTelemetry(w http.ResponseWriter, r *http.Request) {
	var req TelemetryRequest
	if !decodeBody(w, r, maxTelemetryBody, &req) {
		return
	}
	if len(req.Payload) > 0 && len(req.PayloadBase64) > 0 {
		apiError(w, http.StatusBadRequest, "give payload or payload_base64, not both")
		return
	}
	m := hub.Message{Payload: req.PayloadBase64, Properties: req.Properties}
	if len(req.Payload) > 0 {
		m.Payload = req.Payload
	}
	q := g.Hubs.Queue
	if r.URL.Query().Get("wait") == "0" {
		if _, err := q.Enqueue(m); err != nil {
			sendError(w, err)
			return
		}
		writeJSON(w, http.StatusAccepted, map[string]any{"queued": true})
		return
	}
	wait := defaultSendWait
	if t := r.URL.Query().Get("timeout"); t != "" {
		d, err := time.ParseDuration(t)
		if err != nil || d <= 0 || d > maxSendWait {
			apiError(w, http.StatusBadRequest, fmt.Sprintf("timeout: want a duration up to %s, such as 10s", maxSendWait))
			return
		}
		wait = d
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	if err := q.Send(ctx, m); err != nil {
		sendError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"delivered": true})
}

// sendError answers a refused or unconfirmed telemetry message.
func sendError(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, hub.ErrQueueFull):
		w.Header().Set("Retry-After", "5")
		apiError(w, http.StatusServiceUnavailable, err.Error())
	case errors.Is(err, hub.ErrTooLarge):
		apiError(w, http.StatusRequestEntityTooLarge, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		apiError(w, http.StatusGatewayTimeout, err.Error())
	case errors.Is(err, context.Canceled):
		apiError(w, http.StatusServiceUnavailable, err.Error()) // the agent is stopping
	default:
		apiError(w, http.StatusBadRequest, err.Error())
	}
}

func (g *Gateway) handleTwin(w http.ResponseWriter, r *http.Request) {
	c := g.Hubs.Client()
	if c == nil {
		apiError(w, http.StatusServiceUnavailable, errNoSession.Error())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), hubCallTimeout)
	defer cancel()
	t, err := c.Twin(ctx)
	if err != nil {
		hubError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, t)
}

func (g *Gateway) handlePatchReported(w http.ResponseWriter, r *http.Request) {
	var patch map[string]json.RawMessage
	if !decodeBody(w, r, maxPatchBody, &patch) {
		return
	}
	if patch == nil {
		apiError(w, http.StatusBadRequest, "the patch must be a JSON object")
		return
	}
	if _, ok := patch[ReportedKey]; ok {
		apiError(w, http.StatusBadRequest, fmt.Sprintf("%q is the agent's own reported property", ReportedKey))
		return
	}
	c := g.Hubs.Client()
	if c == nil {
		apiError(w, http.StatusServiceUnavailable, errNoSession.Error())
		return
	}
	body, _ := json.Marshal(patch)
	ctx, cancel := context.WithTimeout(r.Context(), hubCallTimeout)
	defer cancel()
	v, err := c.UpdateReported(ctx, body)
	if err != nil {
		hubError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]int64{"version": v})
}

func hubError(w http.ResponseWriter, err error) {
	var se *hub.StatusError
	switch {
	case errors.As(err, &se) && se.Status == http.StatusBadRequest:
		apiError(w, http.StatusBadRequest, err.Error())
	case errors.As(err, &se):
		apiError(w, http.StatusBadGateway, err.Error())
	case errors.Is(err, hub.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		apiError(w, http.StatusGatewayTimeout, err.Error())
	default:
		apiError(w, http.StatusServiceUnavailable, err.Error())
	}
}

// handleEvents streams what the application subscribed to as JSON lines until it hangs up,
// or falls so far behind that the agent drops it.
func (g *Gateway) handleEvents(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	s := &subscriber{
		c2d:     q.Get("c2d") == "1",
		desired: q.Get("desired") == "1",
		since:   time.Now(),
		events:  make(chan Event, subscriberBuffer),
		done:    make(chan struct{}),
	}
	for _, m := range q["method"] {
		for name := range strings.SplitSeq(m, ",") {
			switch {
			case name == "":
			case strings.HasPrefix(name, "unicity."):
				apiError(w, http.StatusBadRequest, fmt.Sprintf("method %q: unicity.* methods belong to the agent", name))
				return
			default:
				s.methods = append(s.methods, name)
			}
		}
	}
	if !s.c2d && !s.desired && len(s.methods) == 0 {
		apiError(w, http.StatusBadRequest, "subscribe to something: c2d=1, desired=1 or method=NAME")
		return
	}
	flusher, ok := w.(http.Flusher)
	if !ok {
		apiError(w, http.StatusInternalServerError, "streaming unsupported")
		return
	}
	s.events <- Event{Type: "subscribed", Methods: s.methods}
	g.mu.Lock()
	g.subs[s] = struct{}{}
	if s.c2d {
		// Messages that arrived while nobody listened go to the first listener.
		for len(g.backlog) > 0 && len(s.events) < cap(s.events) {
			s.events <- eventOf(g.backlog[0])
			g.backlog = g.backlog[1:]
		}
		close(g.space)
		g.space = make(chan struct{})
	}
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.dropLocked(s)
		g.mu.Unlock()
	}()

	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	for {
		select {
		case e := <-s.events:
			if enc.Encode(e) != nil {
				return
			}
			if len(s.events) == 0 {
				flusher.Flush()
			}
		case <-s.done:
			return
		case <-r.Context().Done():
			return
		}
	}
}

func (g *Gateway) handleMethodResponse(w http.ResponseWriter, r *http.Request) {
	var a MethodAnswer
	if !decodeBody(w, r, maxResponseBody, &a) {
		return
	}
	if a.Status == nil || *a.Status < 0 || *a.Status > 65535 {
		apiError(w, http.StatusBadRequest, "status: want an integer from 0 to 65535")
		return
	}
	if !g.answer(r.PathValue("id"), hub.MethodResponse{Status: *a.Status, Payload: a.Payload}) {
		apiError(w, http.StatusNotFound, "no method call is waiting for this answer (it may have timed out)")
		return
	}
	writeJSON(w, http.StatusOK, map[string]bool{"answered": true})
}

// decodeBody reads one JSON value of at most limit bytes, strictly; on failure it answers
// 400 (or 413) with the reason and returns false.
func decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil && dec.More() {
		err = errors.New("trailing data after the JSON value")
	}
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("trailing data after the JSON value")
		}
	}
	var tooBig *http.MaxBytesError
	switch {
	case err == nil:
		return true
	case errors.As(err, &tooBig):
		apiError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds %d bytes", limit))
	default:
		apiError(w, http.StatusBadRequest, "invalid JSON body: "+err.Error())
	}
	return false
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func apiError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

// SendTelemetry sends one telemetry message through the running agent and returns once the
// hub has acknowledged it. A full queue or no acknowledgement in time is marked ErrTemporary,
// no agent ErrUnreachable.
func (c *Client) SendTelemetry(ctx context.Context, payload []byte, props map[string]string, wait time.Duration) error {
	body, err := json.Marshal(TelemetryRequest{PayloadBase64: payload, Properties: props})
	if err != nil {
		return err
	}
	path := "/v1/telemetry?timeout=" + url.QueryEscape(wait.String())
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://unicity"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.Is(err, ErrNotRunning) && errors.As(err, &ue) {
			return Mark(ue.Err, ErrUnreachable) // no agent: the request itself says nothing
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	var answer struct {
		Error string `json:"error"`
	}
	json.NewDecoder(bufio.NewReader(io.LimitReader(resp.Body, 64<<10))).Decode(&answer)
	err = fmt.Errorf("agent answered %s: %s", resp.Status, answer.Error)
	switch resp.StatusCode {
	case http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return Mark(err, ErrTemporary)
	}
	return err
}
