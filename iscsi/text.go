package iscsi

import (
	"context"
	"fmt"
	"net"
	"sort"
	"time"

	"cairn.io/cairn/iscsi/pdu"
)

// textState holds a Text Response too long for one PDU, sent in pieces as
// the initiator asks for them (RFC 7143 section 11.11).
type textState struct {
	ttt  uint32
	rest []byte
}

// textRequest answers a Text Request in full feature phase: SendTargets,
// and NotUnderstood for every other key.
func (c *conn) textRequest(p *pdu.PDU) error {
	itt := p.BHS.ITT()
	ttt := p.BHS.U32(pdu.OffTTT)
	if p.BHS.Flags()&0x40 != 0 {
		return fmt.Errorf("%w: multi-PDU text requests are not supported", errProtocol)
	}
	c.mu.Lock()
	st := c.text
	c.text = nil
	c.mu.Unlock()
	var body []byte
	if ttt != reservedTag {
		if st == nil || st.ttt != ttt {
			return fmt.Errorf("%w: text continuation with unknown TTT 0x%x", errProtocol, ttt)
		}
		body = st.rest
	} else {
		kvs, err := pdu.ParseText(p.Data)
		if err != nil {
			return err
		}
		var out []pdu.KV
		for _, kv := range kvs {
			if kv.Key == "SendTargets" {
				out = append(out, c.sendTargets(kv.Value)...)
				continue
			}
			out = append(out, pdu.KV{Key: kv.Key, Value: "NotUnderstood"})
		}
		body = pdu.EncodeText(out)
	}
	r := &pdu.PDU{}
	r.BHS.SetOpcode(pdu.OpTextResp)
	r.BHS.SetITT(itt)
	copy(r.BHS[8:16], p.BHS[8:16])
	if len(body) > c.params.maxSendData {
		c.mu.Lock()
		st := &textState{ttt: c.newTTTLocked(), rest: body[c.params.maxSendData:]}
		c.text = st
		c.mu.Unlock()
		r.BHS[1] = 0x40 // C: continues
		r.BHS.SetU32(pdu.OffTTT, st.ttt)
		r.Data = body[:c.params.maxSendData]
	} else {
		r.BHS[1] = 0x80
		r.BHS.SetU32(pdu.OffTTT, reservedTag)
		r.Data = body
	}
	c.send(&outPDU{p: r, status: true})
	return nil
}

// sendTargets lists targets with the portal the initiator connected to.
// "All" is valid in discovery sessions; in a normal session an empty value
// names the session's own target.
func (c *conn) sendTargets(v string) []pdu.KV {
	addr := c.nc.LocalAddr().String()
	if ta, ok := c.nc.LocalAddr().(*net.TCPAddr); ok {
		addr = net.JoinHostPort(ta.IP.String(), fmt.Sprint(ta.Port))
	}
	var names []string
	switch {
	case v == "All" && c.sess.discovery:
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		vols, err := c.srv.cfg.Exports.List(ctx)
		cancel()
		if err != nil {
			c.log.Error("list exports for SendTargets", "err", err)
			return nil
		}
		for _, vol := range vols {
			names = append(names, c.srv.TargetName(vol))
		}
		sort.Strings(names)
	case v == "" && !c.sess.discovery:
		names = []string{c.sess.targetIQN}
	case v == c.sess.targetIQN && !c.sess.discovery:
		names = []string{v}
	case c.sess.discovery:
		if vol, ok := c.srv.volumeOf(v); ok {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			vols, err := c.srv.cfg.Exports.List(ctx)
			cancel()
			if err == nil {
				for _, x := range vols {
					if x == vol {
						names = []string{c.srv.TargetName(x)}
					}
				}
			}
		}
	}
	var out []pdu.KV
	for _, n := range names {
		out = append(out, pdu.KV{Key: "TargetName", Value: n}, pdu.KV{Key: "TargetAddress", Value: addr + ",1"})
	}
	return out
}
