"""Just-in-time approvals: a request a policy marks ``approve`` waits for people of the approver groups.

- ``model``: the values (who asked, what, who voted) and the pure rules that move an approval from
  pending to approved, denied, expired or used;
- ``store``: where approvals live: in memory (one replica) or in Redis (several), behind one interface;
- ``service``: what the exchange and the approver interfaces call: create, decide, wait, redeem, watch,
  with every step sent to the listeners (the session record, logs, notifications).
"""
