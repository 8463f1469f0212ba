package copysetpb

import "time"

// PeerSilenceLimit is how long a copyset's leader may go without a message
// from a member before the member counts as not replicating: many times the
// heartbeat period of an awake copyset (100 ms by default) and of the beats
// of a quiesced one (half an election timeout).
const PeerSilenceLimit = 3 * time.Second

// Silence is how long the leader had not heard from the peer when it
// reported.
func (p *PeerProgress) Silence() time.Duration {
	return time.Duration(p.GetHeardMsAgo()) * time.Millisecond
}
