package dps

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"

	"github.com/unicity-iot/unicity/internal/dial"
)

// httpsChannel puts the requests to DPS's REST API (certificates.md §4): PUT
// {idScope}/registrations/{registrationId}/register and GET …/operations/{operationId}, each
// with the api-version as over MQTT. A request goes over the connection dial opened, kept
// alive; when DPS has closed it, over a new one dial opens the same way, through the same
// proxy. The replies are the same as over MQTT, with the status in the status line and
// retry-after in its header.
type httpsChannel struct {
	r      *registration
	client *http.Client
	base   string // https://{endpoint}/{idScope}/registrations/{registrationId}

	mu    sync.Mutex
	first net.Conn // the connection dial opened, until the first request takes it
}

func (r *registration) httpsChannel(conn net.Conn) *httpsChannel {
	c := &httpsChannel{r: r, first: conn,
		base: "https://" + r.req.Endpoint + "/" + url.PathEscape(r.req.IDScope) + "/registrations/" + url.PathEscape(r.regID)}
	redial := r.dial
	redial.Transport = dial.TransportHTTPS
	c.client = &http.Client{
		Transport: &http.Transport{
			// dial makes the TLS connection, tunnelled through the proxy when there is one.
			DialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				if conn := c.takeFirst(); conn != nil {
					return conn, nil
				}
				conn, _, err := dial.Dial(ctx, redial)
				return conn, err
			},
			MaxIdleConnsPerHost: 1,
		},
		// DPS does not redirect; a redirect is not followed with the device's credentials.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return c
}

func (c *httpsChannel) takeFirst() net.Conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	conn := c.first
	c.first = nil
	return conn
}

// request sends the request and returns DPS's reply. TPM attestation's first register
// request is answered with a challenge (401 with authenticationKey): once the TPM has taken
// it, the request is sent again, signed with the identity key it imported.
func (c *httpsChannel) request(ctx context.Context, operationID string) (*reply, error) {
	for {
		rep, err := c.roundTrip(ctx, operationID)
		if err != nil || !c.r.challenged(rep) {
			return rep, err
		}
		if err := c.r.activate(ctx, rep.fail.Challenge); err != nil {
			return nil, err
		}
	}
}

func (c *httpsChannel) roundTrip(ctx context.Context, operationID string) (*reply, error) {
	method, target, body := http.MethodPut, c.base+"/register", c.r.body
	if operationID != "" {
		method, target, body = http.MethodGet, c.base+"/operations/"+url.PathEscape(operationID), nil
	}
	target += "?api-version=" + url.QueryEscape(c.r.apiVersion)
	auth, err := c.r.sasToken(ctx)
	if err != nil {
		return nil, err
	}
	reqCtx, cancel := context.WithTimeout(ctx, c.r.replyTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(reqCtx, method, target, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("cannot make the request to DPS: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", userAgent)
	if body != nil {
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, c.failure(ctx, reqCtx, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxReply+1))
	if err != nil {
		return nil, c.failure(ctx, reqCtx, err)
	}
	return usable(parseHTTPReply(resp.StatusCode, resp.Header.Get("Retry-After"), data))
}

// parseHTTPReply parses a response of the REST API as parseReply does an MQTT one: the
// status from the status line, retry-after from its header ("" when absent).
func parseHTTPReply(status int, retryAfter string, body []byte) (*reply, error) {
	r := &reply{status: status}
	if retryAfter != "" {
		r.retryAfter, r.hasRetryAfter = parseRetryAfter(retryAfter)
	}
	return r, r.parseBody(body)
}

// failure classifies a request that got no reply as an MQTT request that got none: the
// caller's context, DPS's silence past the reply timeout, or the network.
func (c *httpsChannel) failure(ctx, reqCtx context.Context, err error) error {
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case reqCtx.Err() != nil:
		return &Error{Message: fmt.Sprintf("DPS did not reply within %s", seconds(c.r.replyTimeout)), temporary: true}
	case errors.Is(err, dial.ErrUnreachable):
		return unreachable("cannot reach DPS at "+c.r.req.Endpoint, err)
	default:
		// Connected, then the connection failed: reset, closed or cut short by DPS or a proxy.
		return unreachable("the connection to DPS dropped while waiting for its reply", err)
	}
}

func (c *httpsChannel) close() {
	if conn := c.takeFirst(); conn != nil {
		conn.Close()
	}
	c.client.CloseIdleConnections()
}
