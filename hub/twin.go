package hub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// Twin is the device twin as the device sees it: the desired and reported sections, each
// with its "$version" member, and those versions.
type Twin struct {
	Desired         json.RawMessage `json:"desired"`
	Reported        json.RawMessage `json:"reported"`
	DesiredVersion  int64           `json:"-"`
	ReportedVersion int64           `json:"-"`
}

// Desired is a change of desired properties: a patch as the hub sent it, or, after a
// reconnect that found a newer version than the last delivered (the hub does not queue
// patches for an offline device), the whole desired section with Full set.
type Desired struct {
	Version    int64
	Properties json.RawMessage // includes "$version"
	Full       bool
}

type response struct {
	status  int
	version int64
	body    []byte
}

// Twin fetches the full twin.
func (c *Client) Twin(ctx context.Context) (Twin, error) {
	const op = "get twin"
	r, err := c.request(ctx, op, func(rid string) string { return "$iothub/twin/GET/?$rid=" + rid }, nil)
	if err != nil {
		return Twin{}, err
	}
	if r.status != 200 {
		return Twin{}, &StatusError{Op: op, Status: r.status}
	}
	var t Twin
	if err := json.Unmarshal(r.body, &t); err != nil {
		return Twin{}, fmt.Errorf("cannot %s: malformed twin from the hub: %w", op, err)
	}
	t.DesiredVersion = sectionVersion(t.Desired)
	t.ReportedVersion = sectionVersion(t.Reported)
	return t, nil
}

// UpdateReported applies patch, a JSON object, to the reported properties (members set to
// null are removed) and returns the new reported version.
func (c *Client) UpdateReported(ctx context.Context, patch json.RawMessage) (int64, error) {
	const op = "update reported properties"
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(patch, &obj); err != nil || obj == nil {
		return 0, fmt.Errorf("cannot %s: the patch must be a JSON object", op)
	}
	r, err := c.request(ctx, op, func(rid string) string {
		return "$iothub/twin/PATCH/properties/reported/?$rid=" + rid
	}, patch)
	if err != nil {
		return 0, err
	}
	if r.status < 200 || r.status > 299 {
		return 0, &StatusError{Op: op, Status: r.status}
	}
	return r.version, nil
}

// request publishes a twin request and waits for the response with its $rid, sending it
// again on the next connection if this one ends first (GET is idempotent, and so is a
// reported patch as far as its values go). RequestTimeout bounds the whole wait.
func (c *Client) request(ctx context.Context, op string, topic func(rid string) string, body []byte) (response, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, c.cfg.RequestTimeout, fmt.Errorf("cannot %s: %w", op, ErrTimeout))
	defer cancel()
	fail := func() (response, error) {
		if cause := context.Cause(ctx); errors.Is(cause, ErrTimeout) {
			return response{}, cause
		}
		return response{}, fmt.Errorf("cannot %s: %w", op, ctx.Err())
	}
	for {
		cn, err := c.awaitConn(ctx)
		if errors.Is(err, ErrClosed) {
			return response{}, fmt.Errorf("cannot %s: %w", op, err)
		}
		if err != nil {
			return fail()
		}
		rid := c.newRID()
		ch := make(chan response, 1)
		c.mu.Lock()
		c.pending[rid] = ch
		c.mu.Unlock()
		tok, err := c.handoff(ctx, cn, func() mqtt.Token { return cn.mc.Publish(topic(rid), 0, false, body) })
		if err != nil {
			c.mu.Lock()
			delete(c.pending, rid)
			c.mu.Unlock()
			if ctx.Err() != nil {
				return fail()
			}
			continue // the connection ended: send it again on the next one
		}
		published := tok.Done()
		r, ok, err := func() (response, bool, error) {
			defer func() {
				c.mu.Lock()
				delete(c.pending, rid)
				c.mu.Unlock()
			}()
			for {
				select {
				case r := <-ch:
					return r, true, nil
				case <-published:
					published = nil
					if err := tok.Error(); err != nil {
						cn.end(fmt.Errorf("cannot publish a twin request: %w", err))
					}
				case <-cn.lost:
					return response{}, false, nil
				case <-ctx.Done():
					return response{}, false, ctx.Err()
				}
			}
		}()
		switch {
		case ok:
			return r, nil
		case err != nil:
			return fail()
		}
	}
}

// twinResponse hands a response to the request waiting for its $rid; a response nobody
// waits for (a timed-out request, a stray $rid) is dropped.
func (c *Client) twinResponse(topic string, body []byte) {
	rest := strings.TrimPrefix(topic, twinResPrefix)
	statusText, query, _ := strings.Cut(rest, "/")
	status, err := strconv.Atoi(statusText)
	if err != nil {
		return
	}
	q, _ := url.ParseQuery(strings.TrimPrefix(query, "?"))
	rid := q.Get("$rid")
	version, _ := strconv.ParseInt(q.Get("$version"), 10, 64)
	c.mu.Lock()
	ch := c.pending[rid]
	c.mu.Unlock()
	if ch == nil {
		return
	}
	select {
	case ch <- response{status: status, version: version, body: body}:
	default:
	}
}

// desiredPatch delivers a notification unless a newer version went out already.
func (c *Client) desiredPatch(r *runState, body []byte) {
	if c.cfg.OnDesired == nil {
		return
	}
	v := sectionVersion(body)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.delivered && v <= c.desired {
		return
	}
	d := Desired{Version: v, Properties: body}
	if !r.deliver(func() { c.cfg.OnDesired(d) }) {
		return // the version is not recorded, so the next resync delivers it in full
	}
	c.desired, c.delivered = v, true
}

// resync runs after every (re)connect: patches sent while the device was offline are lost,
// so it fetches the twin and delivers the whole desired section if its version moved.
func (c *Client) resync(ctx context.Context, r *runState) {
	if c.cfg.OnDesired == nil {
		return
	}
	t, err := c.Twin(ctx)
	if err != nil {
		return // the connection ended or the hub failed: the next connection tries again
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.delivered && t.DesiredVersion <= c.desired {
		return
	}
	d := Desired{Version: t.DesiredVersion, Properties: t.Desired, Full: true}
	if r.deliver(func() { c.cfg.OnDesired(d) }) {
		c.desired, c.delivered = t.DesiredVersion, true
	}
}

// sectionVersion reads "$version" from a twin section or patch; 0 when absent.
func sectionVersion(section json.RawMessage) int64 {
	var v struct {
		Version int64 `json:"$version"`
	}
	if json.Unmarshal(section, &v) != nil {
		return 0
	}
	return v.Version
}
